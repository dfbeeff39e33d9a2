"""sqz_kernels.benchutil: the alternating timer every benchmark reports from."""
import time

from sqz_kernels.benchutil import alternate


def _counting(sleep_s):
    calls = []

    def f():
        calls.append(1)
        time.sleep(sleep_s)
    return f, calls


def test_alternate_medians_and_fastest_rounds():
    slow, n_slow = _counting(0.002)
    fast, n_fast = _counting(0.0)
    med, fastest = alternate({"slow": slow, "fast": fast}, rounds=5, inner=2, warmup=1,
                             with_min=True)
    assert set(med) == set(fastest) == {"slow", "fast"}
    assert len(n_slow) == len(n_fast) == 1 + 5 * 2  # warm-up + rounds x inner, both alike
    assert med["slow"] >= 0.002 and med["fast"] < med["slow"]
    assert all(fastest[k] <= med[k] for k in med)


def test_alternate_calibrates_inner_to_target():
    f, calls = _counting(0.001)
    med = alternate({"f": f}, rounds=2, warmup=1, target_s=0.05)
    # ~50 calls per round (1 ms each for a 50 ms target), not the default 3
    per_round = (len(calls) - 2) / 2  # minus the warm-up and the calibration call
    assert 10 <= per_round <= 50 and per_round == int(per_round)
    assert isinstance(med, dict) and med["f"] >= 0.001


def test_alternate_stops_at_the_budget():
    f, calls = _counting(0.003)
    alternate({"f": f}, rounds=1000, inner=1, warmup=0, budget_s=0.02)
    assert 3 <= len(calls) < 50  # at least 3 rounds, then the budget ends it
