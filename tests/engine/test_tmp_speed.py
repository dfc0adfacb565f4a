import time, torch, sys
sys.path.insert(0, "/work/main/tests/engine")
import test_engine as te
from test_engine import root, oracle, one_torch_thread, llm  # noqa

def test_speed(oracle, llm):
    orig_step = llm.step
    times = []
    def timed():
        s = time.time(); r = orig_step(); times.append(time.time() - s); return r
    llm.step = timed
    og = oracle.greedy
    gt = []
    def g(*a):
        s = time.time(); r = og(*a); gt.append((a[0], round(time.time() - s, 3))); return r
    oracle.greedy = g
    s = time.time()
    te.test_continuous_batching_with_joins_and_leaves_matches_peft(llm, oracle)
    print("total", time.time() - s)
    print("steps", len(times), sum(times), [round(x, 3) for x in times])
    print("greedy", gt)
