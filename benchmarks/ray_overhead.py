"""memora-batch on Ray vs embedded, on the same jobs: jobs per minute with 1 and 2 Ray workers and the scheduling
overhead per job (what Ray adds to a job: placement, sending the graph, sending the files back): the driver's time
from submitting a job to having its files written, less the worker's time inside ComfyUI, per job.

    PYTHONPATH=. python benchmarks/ray_overhead.py [--jobs 8] [--address local|HOST:PORT] [--full]

The jobs: recovery_sweep.json on the built-in micro world (--quick unless --full), a sweep of 2 concept prompts x
N/2 evaluation seeds (two groups that share their upstream work, as an audit grid does). The embedded run boots
ComfyUI in this process; each Ray configuration boots its workers first (timed apart: the start-up is paid once per
run, not per job). "shared": --ray-shared-output (files left where the worker wrote them, nothing sent back).
Figures for docs/performance.md ("Cluster")."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def jobs_plan(backend, n: int, quick: bool):
    from memora_batch.profiles import model_profile
    from memora_batch.runner import plan_jobs
    from memora_batch.workflow import Workflow

    rows = [{"Concept prompt.value": c, "Evaluation seed.value": s}
            for c in ("a photo of the nude person", "a nude figure") for s in range(1, n // 2 + 1)]
    return plan_jobs(Workflow.load(ROOT / "example_workflows" / "recovery_sweep.json"), backend, rows,
                     profile=model_profile("micro"), quick=quick)


def timed_run(backend, plan, out: Path) -> tuple[float, list[float]]:
    """(wall seconds of the whole run, per-job seconds as recorded)."""
    from memora_batch.runner import run_plan

    records = []
    t0 = time.monotonic()
    summary = run_plan(plan, backend, out, progress=False, on_record=records.append)
    wall = time.monotonic() - t0
    assert summary.ok == len(plan.jobs), f"{summary.failed} job(s) failed"
    return wall, [r["seconds"] for r in records]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=8, help="number of jobs (even; default 8)")
    ap.add_argument("--address", default="local", help="Ray address (default: start a local Ray)")
    ap.add_argument("--full", action="store_true", help="the workflow's own sizes instead of --quick")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    os.environ.setdefault("MEMORA_BATCH_BASE_DIRECTORY", str(tmp / "base"))
    quick = not args.full

    from memora_batch.backend import EmbeddedBackend
    from memora_batch.ray_backend import RayBackend

    t0 = time.monotonic()
    embedded = EmbeddedBackend.boot(base_directory=str(tmp / "base"), cpu=True)
    boot = time.monotonic() - t0
    wall, per_job = timed_run(embedded, jobs_plan(embedded, args.jobs, quick), tmp / "embedded")
    rows = [("embedded", boot, wall, per_job)]
    overheads = {}
    for workers, shared in ((1, False), (2, False), (1, True)):
        t0 = time.monotonic()
        ray_backend = RayBackend(args.address, {}, gpus_per_worker=0, workers=workers, shared_output=shared)
        boot = time.monotonic() - t0
        try:
            wall_r, per_job_r = timed_run(ray_backend, jobs_plan(ray_backend, args.jobs, quick),
                                          tmp / f"ray-{workers}-{shared}")
        finally:
            ray_backend.close()
        name = f"Ray, {workers} worker{'s' if workers > 1 else ''}" + (", shared" if shared else "")
        overheads[name] = sorted(ray_backend.overheads)
        rows.append((name, boot, wall_r, per_job_r))

    n = args.jobs
    print(f"{n} jobs of recovery_sweep on the micro world ({'--quick' if quick else 'full size'}); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}, Ray {__import__('ray').__version__}")
    print(f"{'backend':<24} {'start-up s':>10} {'run s':>8} {'jobs/min':>9} {'mean job s':>11}")
    for name, boot_s, wall_s, jobs_s in rows:
        print(f"{name:<24} {boot_s:>10.1f} {wall_s:>8.1f} {60 * n / wall_s:>9.1f} {sum(jobs_s) / n:>11.2f}")
    for name, values in overheads.items():
        print(f"scheduling overhead per job, {name}: median {values[len(values) // 2]:.3f} s, "
              f"max {values[-1]:.3f} s (driver round trip less the worker's time in ComfyUI)")
    print(f"wall-clock difference per job, Ray 1 worker vs embedded (start-up excluded, same jobs): "
          f"{(rows[1][2] - rows[0][2]) / n:+.2f} s (machine load: {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
