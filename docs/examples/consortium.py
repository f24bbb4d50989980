"""A consortium in one script, through flexmoe's Python API (docs/api.md).

The coordinator trains the public anchor; two owners each train one expert on their own text
(one ExpertSpec each); the coordinator merges them; the owners run two federated rounds on
Flower; the merged model is scored on every domain's held-out text.

Run it beside a folder ``corpus/`` holding ``public.jsonl``, ``law.jsonl`` and ``code.jsonl``
(one JSON object per line with a ``text`` field). The sizes here fit a laptop CPU in a minute;
a real consortium imports a 1B-7B anchor (``flexmoe anchor import``) and trains longer.
"""

from dataclasses import replace
from pathlib import Path

from flexmoe.anchor import train_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.device import pick_device
from flexmoe.evaluate.perplexity import evaluate_model
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec, PublicShare
from flexmoe.expert.train import train_expert
from flexmoe.federated.flower import RoundPlan
from flexmoe.federated.owner import OwnerText
from flexmoe.federated.run import federate
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge
from flexmoe.model.config import ModelDims
from flexmoe.training.config import EXPERT_TRAINING

corpus, work = Path("corpus"), Path("work")
device = pick_device("auto")  # CUDA with bf16 autocast where there is a GPU, else the CPU
public = DataSpec("public", (str(corpus / "public.jsonl"),))
owners = {name: DataSpec(name, (str(corpus / f"{name}.jsonl"),)) for name in ("law", "code")}
short = replace(EXPERT_TRAINING, steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0)

# 1. The coordinator: the public anchor, trained on public text only.
train_anchor(
    data=[public],
    out=work / "anchor",
    dims=ModelDims(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    cfg=short,
    device=device,
    cache_dir=work / "cache",
    vocab_size=512,
    overwrite=True,
)

# 2. Each owner, at home: one expert against the frozen anchor; only the package leaves.
packages = []
for name, data in owners.items():
    spec = ExpertSpec(
        anchor=work / "anchor",
        data=(data,),
        identity=ExpertIdentity(name=name, owner=f"{name} org", license="CC-BY-4.0"),
        schedule=short,
        public=PublicShare(data=(public,), fraction=0.25),
    )
    train_expert(spec, out=work / name, device=device, cache_dir=work / "cache", overwrite=True)
    packages.append(work / name)

# 3. The coordinator merges the anchor and the experts into one FlexOlmo model.
plan = plan_merge(work / "anchor", packages, top_k=2)
build_merged(plan, work / "merged", overwrite=True)

# 4. Federated rounds on Flower: every owner trains what all share, on its own text.
texts = [OwnerText(name, (data,), (public,)) for name, data in owners.items()]
one_step = replace(short, steps=1)
rounds = RoundPlan(2, ("trunk",), slot=one_step, router=one_step, trunk=one_step)
result = federate(
    work / "merged", texts, rounds, work / "federated", device=device, cache_dir=work / "cache"
)

# 5. Score the model on every domain's held-out text (bits per byte: lower is better).
for score in evaluate_model(result.out, [public, *owners.values()], device=device, cache_dir=None):
    print(f"{score.domain}: {score.bits_per_byte:.4f} bits per byte")
