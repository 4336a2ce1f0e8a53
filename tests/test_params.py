"""ParamSpace: flat vectors ⇄ tensors and dicts of tensors, and its error messages."""

import pytest
import torch
from _helpers import DEVICE_PARAMS

from linops.params import ParamSpace


def _params(device="cpu", dtype=torch.float64):
    return {
        "w": torch.randn(2, 3, dtype=dtype, device=device),
        "b": torch.randn(2, dtype=dtype, device=device),
        "s": torch.randn((), dtype=dtype, device=device),
    }


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_dict_round_trip_matches_manual_concatenation(device):
    p = _params(device)
    space = ParamSpace(p)
    assert space.numel == 9 and len(space) == 9
    assert space.names == ("w", "b", "s")
    assert space.dtype == torch.float64 and space.device.type == device
    v = space.flatten(p)
    expected = torch.cat([p["w"].reshape(-1), p["b"], p["s"].reshape(1)])
    assert torch.equal(v, expected)
    back = space.unflatten(v)
    assert list(back) == ["w", "b", "s"]
    for n in p:
        assert back[n].shape == p[n].shape
        assert torch.equal(back[n], p[n])


def test_tensor_space_keeps_shape():
    x = torch.randn(3, 4)
    space = ParamSpace(x)
    assert space.numel == 12 and not space.is_dict
    v = space.flatten(x)
    assert torch.equal(v, x.reshape(-1))
    assert torch.equal(space.unflatten(v), x)
    V = torch.randn(12, 5)
    batch = space.unflatten(V)
    assert batch.shape == (5, 3, 4)
    assert torch.equal(batch[2], V[:, 2].reshape(3, 4))


def test_matrix_of_k_vectors_puts_k_in_front_and_round_trips():
    p = _params()
    space = ParamSpace(p)
    V = torch.randn(9, 4, dtype=torch.float64)
    d = space.unflatten(V)
    assert d["w"].shape == (4, 2, 3) and d["b"].shape == (4, 2) and d["s"].shape == (4,)
    for j in range(4):
        col = space.unflatten(V[:, j])
        for n in p:
            assert torch.equal(d[n][j], col[n])
    assert torch.equal(space.flatten(d), V)


def test_split_gives_views_of_a_vector():
    space = ParamSpace(_params())
    v = torch.zeros(9, dtype=torch.float64)
    parts = space.split(v)
    parts[1].fill_(1.0)
    assert v[6:8].eq(1).all() and v[:6].eq(0).all()


def test_zeros():
    space = ParamSpace(_params())
    assert space.zeros().shape == (9,) and space.zeros(3).shape == (9, 3)
    assert space.zeros().dtype == torch.float64


def test_equality():
    assert ParamSpace(_params()) == ParamSpace(_params())
    assert ParamSpace(_params()) != ParamSpace({"w": torch.zeros(2, 3, dtype=torch.float64)})


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"w": torch.zeros(2, 3, dtype=torch.float64)}, r"missing \['b', 's'\]"),
        ({**_params(), "extra": torch.zeros(1)}, r"unexpected \['extra'\]"),
        ({**_params(), "b": torch.zeros(3, dtype=torch.float64)}, r"'b' has shape \(3,\)"),
        ({**_params(), "b": torch.zeros(2, dtype=torch.float32)}, "dtype"),
    ],
)
def test_flatten_errors_name_the_problem(bad, match):
    space = ParamSpace(_params())
    with pytest.raises(ValueError, match=match):
        space.flatten(bad)


def test_unflatten_wrong_length():
    space = ParamSpace(_params())
    with pytest.raises(ValueError, match=r"\(9,\) or a matrix \(9, k\); got shape \(8,\)"):
        space.unflatten(torch.zeros(8))
    with pytest.raises(TypeError, match="flat tensor"):
        space.unflatten([0.0] * 9)


def test_construction_errors():
    with pytest.raises(ValueError, match="empty"):
        ParamSpace({})
    with pytest.raises(TypeError, match="tensor or a dict"):
        ParamSpace([torch.zeros(2)])
    with pytest.raises(TypeError, match="'a' is a list"):
        ParamSpace({"a": [1.0]})
    with pytest.raises(ValueError, match="one dtype"):
        ParamSpace({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="no entries"):
        ParamSpace({"a": torch.zeros(0)})
    with pytest.raises(TypeError, match="expected a dict|Expected a dict"):
        ParamSpace(_params()).flatten(torch.zeros(9))
