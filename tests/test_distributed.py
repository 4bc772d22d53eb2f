"""leantune.distributed: W processes (torchrun, gloo) equal 1 process at the same global batch.

The multi-process tests run tests/dist_helpers.py under ``python -m torch.distributed.run --standalone
--nproc-per-node 2`` and compare rank 0's results with the same loop run here in one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_helpers
from leantune.distributed import (
    DistContext,
    LossModule,
    PeerLostError,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state_dict,
    gather_objects,
    init_distributed,
    is_peer_lost,
    load_full_state_dict,
    peer_guard,
    rank_micro_steps,
    strip_nproc,
    sync_gradients,
    torchrun_command,
    unwrap,
    wrap_for_training,
)

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().with_name("dist_helpers.py")
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep), **extra)
    return env


def _torchrun(args: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HELPER), *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def single_process(monkeypatch):
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    return init_distributed("cpu")


# ----------------------------------------------------------------------------------------------
# Pure functions and the single-process context


@pytest.mark.parametrize("world_size,grad_accum", [(1, 3), (2, 2), (3, 1), (4, 3)])
def test_rank_micro_steps_partition_the_one_process_batches(world_size, grad_accum):
    for step in range(5):
        per_rank = [rank_micro_steps(step, grad_accum, world_size, r) for r in range(world_size)]
        flat = [i for ids in per_rank for i in ids]
        assert len(set(flat)) == len(flat), "ranks overlap"
        one = rank_micro_steps(step, grad_accum * world_size, 1, 0)
        assert sorted(flat) == one, "W ranks at accumulation A != 1 process at A*W"
        assert all(len(ids) == grad_accum for ids in per_rank)


def test_rank_micro_steps_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        rank_micro_steps(0, 1, 2, 2)


def test_single_process_context_is_identity(single_process):
    ctx = single_process
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, backend=None, device=torch.device("cpu"))
    assert ctx.is_main and not ctx.is_distributed
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(2.5, ctx) == 2.5
    assert all_reduce_sum(t, ctx) is t
    assert broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert gather_objects(7, ctx) == [7]
    barrier(ctx)
    module = torch.nn.Linear(2, 2)
    assert wrap_for_training(module, ctx, "ddp") is module
    with sync_gradients(module, enabled=False):
        pass


def test_world_size_without_master_addr_is_refused(monkeypatch):
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT unset: launch with `torchrun"):
        init_distributed("cpu")


def test_peer_guard_names_the_rank_and_passes_other_errors():
    ctx = DistContext(rank=3, world_size=4, local_rank=1, backend="gloo", device=torch.device("cpu"))
    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:36790. This is typically ...")
    assert is_peer_lost(gloo) and not is_peer_lost(RuntimeError("shape mismatch"))
    with pytest.raises(PeerLostError, match=r"rank 3 lost its peers \(.*Connection closed by peer.*\); resume with --resume"):
        with peer_guard(ctx):
            raise gloo
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with peer_guard(ctx):
            raise RuntimeError("shape mismatch")


def test_state_dict_round_trip_single_process(single_process):
    """One process writes and reads the same names as W processes (the model's own, unwrapped)."""
    from leantune.adapters.lora import apply_adapter, trainable_state
    from leantune.config import AdapterConfig
    from leantune.models.tiny import tiny_model

    model = apply_adapter(tiny_model(), AdapterConfig(r=2), seed=0)
    wrapped = wrap_for_training(LossModule(model, lambda m, b: m(**b).loss), single_process, "ddp")
    assert unwrap(wrapped) is model
    state = full_state_dict(wrapped, single_process, trainable_only=True)
    assert set(state) == set(trainable_state(model)) and all(t.device.type == "cpu" for t in state.values())
    other = apply_adapter(tiny_model(), AdapterConfig(r=2), seed=1)
    assert any(_rel(trainable_state(other)[k], v) > 0 for k, v in state.items() if v.norm() > 0)
    load_full_state_dict(other, state, single_process, trainable_only=True)
    assert all(torch.equal(trainable_state(other)[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="missing"):
        load_full_state_dict(other, dict(list(state.items())[1:]), single_process, trainable_only=True)


def test_torchrun_command_drops_nproc():
    assert strip_nproc(["train", "--nproc", "2", "r.yaml"]) == ["train", "r.yaml"]
    cmd = torchrun_command(4, ["train", "r.yaml", "--nproc=4", "--resume"])
    assert cmd[0] == sys.executable and cmd[-3:] == ["train", "r.yaml", "--resume"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    with pytest.raises(ValueError, match="needs a number"):
        strip_nproc(["train", "--nproc"])


# ----------------------------------------------------------------------------------------------
# 2 processes == 1 process


DEFAULT_SPECS = ["ddp:lora", "fsdp:full", "fsdp:full:tied"]  # tied: SmolLM2's lm_head is its embedding
SLOW_SPECS = ["fsdp:lora", "ddp:full:tied", "ddp:lora:ckpt", "fsdp:full:tied:ckpt"]


def _two_process_job(out: Path, specs: list[str]) -> dict:
    proc = _torchrun([str(out), ",".join(specs)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """One torchrun job (2 ranks, gloo) running every default configuration in turn."""
    return _two_process_job(tmp_path_factory.mktemp("dist") / "rank0.pt", DEFAULT_SPECS)


def _compare_with_one_process(dist_result: dict, spec: str):
    parallel, method, *flags = spec.split(":")
    assert dist_result["world_size"] == 2
    ref = dist_helpers.run(parallel, method, flags=frozenset(flags))  # one process, accumulation 4 = 2 x 2
    assert ref["world_size"] == 1
    torch.testing.assert_close(torch.tensor(dist_result["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    # the gradient norm is what tells a sum over ranks from DDP's default mean (AdamW alone would not)
    torch.testing.assert_close(torch.tensor(dist_result["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0)
    assert len(ref["losses"]) == 3 and ref["losses"][-1] < ref["losses"][0]
    assert set(dist_result["final"]) == set(ref["final"])
    worst = max(_rel(dist_result["final"][k], ref["final"][k]) for k in ref["final"])
    assert worst < 1e-5, f"final weights differ by {worst:.2e} (relative)"
    assert dist_result["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)  # no-grad forward, all ranks
    # resume from the full state dicts (weights + optimizer) == uninterrupted, in W processes
    assert dist_result["resumed_loss"] == dist_result["losses"][-1]
    assert all(torch.equal(dist_result["resumed"][k], dist_result["final"][k]) for k in ref["final"])
    if method == "lora":
        assert all("lora_" in k for k in ref["final"])  # only the adapter trains and is saved
    else:
        # the chunked loss reads lm_head.weight directly inside the root's forward (under FSDP2 the
        # all-gathered root parameter): the head must train and match one process
        assert "lm_head.weight" in ref["final"]
        start = dist_helpers.tiny_model(vocab_size=len(dist_helpers.tiny_tokenizer()), seed=0, tie="tied" in flags)
        assert _rel(ref["final"]["lm_head.weight"], start.lm_head.weight.detach()) > 1e-4
        assert _rel(dist_result["final"]["lm_head.weight"], ref["final"]["lm_head.weight"]) < 1e-5


@pytest.mark.parametrize("spec", DEFAULT_SPECS)
def test_two_processes_equal_one(two_process_results, single_process, spec):
    _compare_with_one_process(two_process_results[spec], spec)


@pytest.mark.slow
def test_two_processes_equal_one_more_configurations(tmp_path, single_process):
    results = _two_process_job(tmp_path / "rank0.pt", SLOW_SPECS)
    for spec in SLOW_SPECS:
        _compare_with_one_process(results[spec], spec)


# ----------------------------------------------------------------------------------------------
# A dead peer


def test_peer_killed_under_torchrun(tmp_path):
    """Rank 1 SIGKILLs itself at step 1: rank 0 must stop with the clear message, not hang."""
    t0 = time.perf_counter()
    proc = _torchrun([str(tmp_path / "x.pt"), "ddp:lora", "1"], timeout=120, LEANTUNE_TEST_TIMEOUT="10")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rank 0 lost its peers" in out and "resume with --resume" in out, out[-3000:]
    assert not (tmp_path / "x.pt").exists()
    assert time.perf_counter() - t0 < 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_peer_killed_without_agent(tmp_path):
    """Multi-node case: no local agent stops the survivor, gloo itself must report the dead peer."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), LEANTUNE_TEST_TIMEOUT="10")
        procs.append(subprocess.Popen([sys.executable, str(HELPER), str(tmp_path / "x.pt"), "ddp:lora", "1"],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0
    assert "rank 0 lost its peers" in outs[0] and "resume with --resume" in outs[0], outs[0][-3000:]


@pytest.mark.slow
def test_launch_torchrun_runs_the_cli_on_every_rank(monkeypatch, capfd):
    from leantune.distributed import launch_torchrun

    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    assert launch_torchrun(2, ["validate", "recipes/mezo_lora.yaml", "--nproc", "2"]) == 0
    assert capfd.readouterr().out.count("ok  recipes/mezo_lora.yaml") == 2
    # a failing worker: torchrun reports it with its own exit code 1
    assert launch_torchrun(2, ["validate", "recipes/does-not-exist.yaml"]) != 0


HANG_SCRIPT = """
import time
from leantune.distributed import all_reduce_sum, init_distributed
ctx = init_distributed("cpu", timeout_s=2)
if ctx.rank == 1:
    time.sleep(60)  # alive, but never joins the collective
all_reduce_sum(1.0, ctx)
"""


def test_silent_peer_times_out_with_the_clear_message(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        out = procs[0].communicate(timeout=50)[0]
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode != 0
    assert "rank 0 lost its peers" in out and "Timed out" in out and "resume with --resume" in out, out[-2000:]
