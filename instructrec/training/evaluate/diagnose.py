"""Why does an instruction model rank the way it does? Two measurements on a report folder's
validation candidates (``python -m instructrec.training.evaluate.diagnose --model M --report OUT``):

- ``encoder_cosine``: mean pairwise cosine between the mean-pooled encoder outputs of
  different users' instructions. Near 1 means the encoder says the same thing for every
  input (collapsed) and the decoder cannot read the instruction.
- ``prior``: HR@1 / NDCG@5 after subtracting ``alpha`` times each candidate's log-likelihood
  under an empty instruction. If alpha = 1 falls to chance, the ranking came from the
  candidates' own likelihood, not from the instruction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from instructrec.text import normalise

from ..data.load import load_dataset
from ..data.types import DataError
from ..metrics import metrics_from_ranks, rank_of
from . import candidates as cand
from .scenarios import get_scenarios


def encoder_cosine(model, sources: list[str]) -> float:
    loaded = model.loaded
    vectors = []
    with torch.no_grad():
        for src in sources:
            ids = torch.tensor([model.ranker.source_ids(src)[0]], device=loaded.model.device)  # cut as the ranker cuts
            hidden = loaded.model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()
            vectors.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    v = torch.stack(vectors)
    sims = v @ v.T
    n = len(vectors)
    return float((sims.sum() - n) / (n * (n - 1)))


def main(argv: list[str] | None = None) -> int:
    from ..annotate.pipeline import load_annotations
    from .methods import InstructionModel
    from .run import scenario_needs

    parser = argparse.ArgumentParser(prog="python -m instructrec.training.evaluate.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--report", required=True, help="an `instructrec evaluate` folder (its candidates and annotations)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--scenario", default="sequential")
    parser.add_argument("--template", default=None)
    parser.add_argument("--alphas", default="0,0.5,0.75,1")
    args = parser.parse_args(argv)

    report = Path(args.report)
    try:
        data = load_dataset(args.data)
        file = cand.read(report / "candidates" / "valid-uniform-10.jsonl", data)
    except (DataError, FileNotFoundError) as exc:
        print(f"diagnose: {exc}", file=sys.stderr)
        return 2
    annotations_path = report / "annotations.jsonl"
    annotations = load_annotations(annotations_path) if annotations_path.exists() else {}
    scenario = get_scenarios([args.scenario])[0]
    model = InstructionModel(data, args.model, "diagnosed")
    template = args.template or scenario.templates()[0].id
    used = scenario_needs(data, file, scenario, annotations, model.max_history)
    if not used:
        print(f"{file.path}: no case usable by scenario {args.scenario}", file=sys.stderr)
        return 2
    cases, needs = [c for c, _ in used], [n for _, n in used]
    scores = model.score(cases, needs, template, str(file.path))
    titles = sorted({normalise(data.title(x)) for c in cases for x in c.candidates})
    prior: dict[str, float] = {}
    for i in range(0, len(titles), 100):
        chunk = titles[i:i + 100]
        prior.update(zip(chunk, model.ranker.score("", chunk).scores))
    rows = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        ranks = [rank_of([s - alpha * prior[normalise(data.title(x))] for s, x in zip(row, c.candidates)], c.positive)
                 for row, c in zip(scores, cases)]
        m = metrics_from_ranks(ranks)
        rows.append({"alpha": alpha, "hr@1": round(m["hr@1"], 4), "ndcg@5": round(m["ndcg@5"], 4)})
    result = {"model": args.model, "candidates": str(file.path), "scenario": args.scenario, "template": template,
              "cases": len(cases), "encoder_cosine": round(encoder_cosine(model, model.sources(needs[:50], template)), 4),
              "prior": rows}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
