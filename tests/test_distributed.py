"""run_on_main: rank 0 works while the others wait, on 2 real gloo ranks in child processes."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_prep.errors import UserError
from medgan.distributed import run_on_main


def _rank(rank: int, port: int, scenario: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def work():
        if scenario == "slow":
            time.sleep(3)
        if scenario == "user_error":
            raise UserError("--data_path x: no such folder")
        if scenario == "bug":
            raise KeyError("oops")
        return f"made by rank {dist.get_rank()}"

    timeout = timedelta(seconds=1) if scenario == "slow" else timedelta(seconds=60)
    try:
        results[rank] = ("ok", run_on_main(work, timeout, "shard x"))
    except UserError as error:
        results[rank] = ("UserError", str(error))
    except KeyError as error:
        results[rank] = ("KeyError", str(error))
    finally:
        dist.destroy_process_group()


def _run(scenario: str) -> dict:
    from medgan.distributed import _free_port

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(_free_port(), scenario, results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize(
    "scenario, expected",
    [
        ("ok", {0: ("ok", "made by rank 0"), 1: ("ok", "made by rank 0")}),
        ("user_error", {r: ("UserError", "--data_path x: no such folder") for r in (0, 1)}),
        ("bug", {0: ("KeyError", "'oops'"), 1: ("UserError", "rank 0 failed to shard x: KeyError: 'oops'")}),
    ],
)
def test_every_rank_gets_rank_0s_result_or_its_error(scenario, expected):
    assert _run(scenario) == expected


def test_a_wait_past_the_timeout_is_one_line_naming_the_work():
    results = _run("slow")
    waited = "rank 1 waited 0:00:01 for rank 0 to shard x and gave up ("
    late = "rank 0 could shard x, but the other ranks had stopped waiting after 0:00:01 ("
    assert results[1][0] == "UserError" and results[1][1].startswith(waited), results[1]
    assert results[0][0] == "UserError" and results[0][1].startswith(late), results[0]
    assert all("\n" not in message for _, message in results.values())
