import time, sys
from dsched.state import events as ev
from dsched.state.machine import SchedulerState
from dsched.server.errors import killed_worker
from dsched.policy import PolicyConfig, make_policy
try:
    from dsched.core import Core
    from dsched.ext.registry import default_extensions
    NEW = True
except ImportError:
    NEW = False
N = 20000
def run():
    state = SchedulerState(killed_worker=killed_worker)
    policy = make_policy("dask", PolicyConfig())
    sent = []
    if NEW:
        core = Core(state, policy, default_extensions())
        def handle(e, now): core.handle(e, now)
        def flush(now):
            out = core.flush(now).out
            for a, ms in out.to_workers.items():
                sent.extend((a, m["key"], m["run_id"]) for m in ms if m["op"] == "compute-task")
    else:
        from dsched.state.outbox import Outbox
        pending = [Outbox()]
        def handle(e, now): state.handle(e, now, pending[0])
        def flush(now):
            out = pending[0]; pending[0] = Outbox()
            while out.policy:
                evs, out.policy = out.policy, []
                d = policy.handle(evs, now)
                if d: state.handle(ev.PolicyDecisions(d), now, out)
            for a, ms in out.to_workers.items():
                sent.extend((a, m["key"], m["run_id"]) for m in ms if m["op"] == "compute-task")
    for i in range(8):
        handle(ev.WorkerConnected(f"tcp://127.0.0.1:{10000+i}", 1), 0.0)
    handle(ev.ClientConnected("c"), 0.0); flush(0.0)
    tasks = [ev.NewTask(f"inc-{i}", (), b"x", {}) for i in range(N)]
    t0 = time.process_time()
    handle(ev.GraphReceived("c", tasks, [t.key for t in tasks], {t.key: i for i, t in enumerate(tasks)}), 0.0); flush(0.0)
    t = 0.0
    while sent:
        t += 0.001
        batch, sent[:] = sent[:50], sent[50:]
        for a, k, r in batch:
            handle(ev.TaskFinished(a, k, r, 8, type=b"int"), t)
        flush(t)
    return (time.process_time() - t0) / N * 1e6
print("new" if NEW else "old", min(run() for _ in range(3)), "us/task")
