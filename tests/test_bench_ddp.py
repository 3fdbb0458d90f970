"""`fitdist bench ddp` end to end on tiny models: both runs launch, the figures are consistent."""

import json

from conftest import run_cli


def test_bench_ddp_smoke():
    result = run_cli("bench", "ddp", "--preset", "small", "--batch", "4", "--steps", "2", "--warmup", "1",
                     "--reps", "1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]

    res = json.loads(result.stdout)
    assert res["img_per_s_1proc"] > 0 and res["img_per_s_2proc"] > 0
    assert abs(res["efficiency"] - res["img_per_s_2proc"] / (2 * res["img_per_s_1proc"])) < 1e-9
