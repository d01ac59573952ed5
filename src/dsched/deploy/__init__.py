"""Starting dsched schedulers from Dask's cluster managers.

``Scheduler`` is a ``SpecCluster`` scheduler class (``distributed.deploy.spec.
ProcessInterface``) that runs ``python -m dsched scheduler`` as a subprocess; ``LocalCluster``
is ``distributed.LocalCluster`` with that scheduler. Both import distributed, so this
package is imported only when used (``dsched.LocalCluster`` resolves lazily).
"""

from dsched.deploy.local import LocalCluster
from dsched.deploy.scheduler import Scheduler

__all__ = ["LocalCluster", "Scheduler"]
