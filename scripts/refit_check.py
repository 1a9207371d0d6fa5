"""The online refit's model check, run for real (``predictor.evaluate`` children) on held-out ChatDev runs.

The serving model is a ``train`` model (seed-0 split); the held-out runs of that split stand in for "the newest
records". Three candidates are checked against it, and against the built-in per-role priors (what a gateway
that started without a model serves): the serving model itself, an alternative the team would accept
(``--alternative``, for example the opt-in ``--upper-fit-levels`` model), and a model trained on the same
ChatDev train runs with every output length multiplied by ``--inflate`` (traffic whose usage was wrong, or a
burst of unusual requests): it covers everything and reserves far more. Then how far the p90 quantile loss of
the serving and the alternative model differ on slices of ``--slice`` held-out records of each source (the
smallest check a refit runs is 50 records), which is the noise ``max_loss_increase`` must let through.
Run from the repository root:

    python scripts/refit_check.py --serving MODEL --alternative MODEL --traces /tmp/maestro-traces

``--max-model-len MODEL=TOKENS`` (repeatable) gives the check the served models' contexts, as a gateway's
configured models give them; without it, a request without ``max_tokens`` is capped at 4096. The check scores the
held-out records' role labels as roles their clients sent (``evaluate --explicit-roles``), as the gateway's own
records are; the slice ratios score them as offline evaluation does, with the labels hidden.

Prints one line per candidate and what it is checked against (coverage, quantile loss, outcome) and one per
source (loss ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import OnlineLearningConfig  # noqa: E402
from predictor.evaluate import collect, context_kv, model_context, quantile_loss  # noqa: E402
from predictor.kv import KVModel  # noqa: E402
from predictor.online import RefitRejected  # noqa: E402
from predictor.predictor import Predictor  # noqa: E402
from predictor.refit_command import HOLDOUT_NAME, TrainCommandRefit  # noqa: E402
from predictor.trace import read_records, write_records  # noqa: E402
from predictor.train import DEFAULT_SEED, DEFAULT_TEST_SIZE, split_records  # noqa: E402

SOURCES = ("chatdev", "ag2", "magentic-one", "tau-bench", "toolbench", "alpaca-eval")
REFUSED_ABOVE = 1.0 + OnlineLearningConfig.max_loss_increase  # the default's loss ratio (before the 1-token allowance)


async def check(work: Path, serving: Path | None, candidates: dict[str, Path], held: int,
                kv: KVModel | None = None) -> None:
    """Each candidate against ``serving`` (a model file; None: the built-in priors, as a gateway without one)."""
    for name, candidate in candidates.items():
        refit = TrainCommandRefit(work, save_path=work / "model.skops", current_path=serving, kv=kv)
        shutil.copy(candidate, refit.candidate_path)
        try:
            await refit._check(held)
            outcome = "served"
        except RefitRejected as exc:
            outcome = f"refused ({'max_loss_increase' if 'max_loss_increase' in str(exc) else 'min_coverage'})"
        c = refit.last_check
        print(f"{name:24s} p90 coverage {c['new_p90_coverage']:.1%}, quantile loss {c['new_p90_quantile_loss']:6.1f}"
              f"  | serving {c['serving']} {c['serving_p90_coverage']:.1%}, {c['serving_p90_quantile_loss']:.1f}"
              f"  -> {outcome}", flush=True)


def slice_ratios(serving: Path, alternative: Path, test, size: int, contexts: dict[str, int]) -> None:
    rows = {}
    default = None if contexts else 4096  # as evaluate --max-model-len scores them
    for name, path in (("serving", serving), ("alternative", alternative)):
        predictor = Predictor.load(path, kv=context_kv(contexts), default_max_tokens=default)
        rows[name] = [r for r in collect(predictor, test, default, contexts=contexts) if r["usable"]]
    for source in SOURCES:
        idx = [i for i, r in enumerate(rows["serving"]) if r["source"] == source]
        ratios = []
        for start in range(0, len(idx) - size + 1, size):
            chunk = idx[start:start + size]
            loss = {name: quantile_loss([rows[name][i]["p90"] for i in chunk], [rows[name][i]["actual"] for i in chunk],
                                        0.9) for name in rows}
            if loss["serving"] > 0:  # a slice the serving model reserved exactly: no ratio
                ratios.append(loss["alternative"] / loss["serving"])
        if ratios:
            r = np.array(ratios)
            over = int(np.sum(r > REFUSED_ABOVE))
            print(f"{source:13s} {len(r):3d} slices of {size}: alternative / serving loss median {np.median(r):.2f}, "
                  f"min {r.min():.2f}, max {r.max():.2f}; above {REFUSED_ABOVE:g}: {over}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving", type=Path, required=True, help="a model from train (default seed-0 split)")
    parser.add_argument("--alternative", type=Path, required=True, help="another acceptable model, same split")
    parser.add_argument("--traces", type=Path, default=Path("/tmp/maestro-traces"))
    parser.add_argument("--inflate", type=int, default=8)
    parser.add_argument("--slice", type=int, default=50)
    parser.add_argument("--max-model-len", type=model_context, action="append", metavar="MODEL=TOKENS",
                        help="a served model's context, as in the gateway's config (repeatable)")
    args = parser.parse_args()
    contexts = [{"name": name, "max_model_len": tokens} for name, tokens in args.max_model_len or []]
    kv = KVModel.from_models(contexts) if contexts else None
    if contexts:
        print("served contexts: " + ", ".join(f"{c['name']} {c['max_model_len']}" for c in contexts))
    records = [r for source in SOURCES for r in read_records(args.traces / f"{source}.jsonl.gz")]
    train, test = split_records(records, DEFAULT_TEST_SIZE, DEFAULT_SEED)
    chatdev_train = [r for r in train if r.get("source") == "chatdev"]
    chatdev_test = [r for r in test if r.get("source") == "chatdev"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp, "work")
        work.mkdir()
        write_records(work / HOLDOUT_NAME, chatdev_test)
        inflated = [{**r, "usage": {**r["usage"], "completion_tokens": r["usage"]["completion_tokens"] * args.inflate}}
                    for r in chatdev_train]
        write_records(Path(tmp, "inflated.jsonl"), inflated)
        print(f"training on {len(inflated)} ChatDev train calls with output lengths x{args.inflate} ...", flush=True)
        subprocess.run([sys.executable, "-m", "predictor.train", "--split", "all", "--quiet", "--data",
                        str(Path(tmp, "inflated.jsonl")), "--out", str(Path(tmp, "inflated.skops"))], check=True)
        candidates = {"the serving model": args.serving, "alternative": args.alternative,
                      f"outputs x{args.inflate}": Path(tmp, "inflated.skops")}
        print(f"check on ChatDev's {len(chatdev_test)} held-out calls (seed-0 split), against --serving:")
        asyncio.run(check(work, args.serving, candidates, len(chatdev_test), kv))
        print("the same, against the built-in priors (a gateway that started without a model):")
        asyncio.run(check(work, None, candidates, len(chatdev_test), kv))
    print("p90 quantile loss on slices of held-out records (seed-0 split):")
    slice_ratios(args.serving, args.alternative, test, args.slice, dict(args.max_model_len or []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
