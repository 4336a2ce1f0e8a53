"""The library's one private plum dispatcher.

Every dispatched generic in ``linops`` and ``solvers`` is registered on this
``Dispatcher``, never on plum's global ``dispatch``, so that linops cannot clash with
other packages that use plum. Users extend the library by registering their own rules::

    from linops import dispatch

    @dispatch
    def psd_rule(A: MyOperator) -> bool:
        return True
"""

from plum import Dispatcher

dispatch = Dispatcher()
