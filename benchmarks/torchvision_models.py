"""Plans and full-rank round trips of torchvision's ImageNet classifiers at 224 × 224.

Each model is built WITHOUT weights (random initialisation: nothing here is about accuracy), in
float64. For each: the plan of a channel SVD keeping half of each layer's parameters (its
parameters and MACs, and the layers it lists as not factorizable, with the reason); then every
plannable layer factorized at full rank (the plan's entries edited into SVDs, as full rank saves
nothing), and the largest difference of the compressed model's output from the dense one's on
one random image, relative to the largest output. The unit tests do the same on small versions
at 32 × 32 (tests/test_architectures.py); this is the check at full size.
Run: .venv/bin/python benchmarks/torchvision_models.py [resnet18 ...]
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when the OpenMP runtime starts

import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402
import torchvision.models as tm  # noqa: E402

import lowrank as lr  # noqa: E402

MODELS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "convnext_tiny", "vit_b_16"]
SIZE = (3, 224, 224)
torch.set_num_threads(2)
lines = ["# torchvision classifiers: plans and full-rank round trips at 224 × 224", "",
         "Random weights, float64; channel SVD. `plan 50 %`: each layer at the rank keeping half its "
         "parameters; `exact`: every plannable layer factorized at full rank, largest output difference "
         "relative to the largest output. "
         f"{torch.get_num_threads()} threads, {lr.measure.machine()}.", "",
         "| model | params | MACs | layers planned | plan 50 %: params, MACs | not factorizable (reason: count) "
         "| exact | time |", "|---|---|---|---|---|---|---|---|"]
for name in sys.argv[1:] or MODELS:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = getattr(tm, name)().double().eval()
    plan = lr.plan(model, "svd", 0.5, input_size=SIZE)
    kinds = Counter(s["reason"].split(" (")[0].split(":")[0] for s in plan.skipped.values())
    full = lr.plan(model, "svd", lambda layer: layer.full_rank(), input_size=SIZE)
    for entry in full.layers.values():
        entry["method"] = "svd"
    small = lr.compress(model, full, progress=False)
    x = torch.randn(1, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, factorized = model(x), small(x)
    difference = float((factorized - reference).abs().max() / reference.abs().max())
    assert difference < 1e-9, (name, difference)
    assert full.params == lr.measure.params(small) and full.macs == lr.measure.macs(small, SIZE)
    skipped = "; ".join(f"{reason}: {n}" for reason, n in kinds.items()) or "none"
    lines.append(f"| {name} | {plan.model_params / 1e6:.1f} M | {plan.model_macs / 1e9:.2f} G | {len(plan)} | "
                 f"{plan.params / plan.model_params:.1%}, {plan.macs / plan.model_macs:.1%} | {skipped} | "
                 f"{difference:.0e} | {time.perf_counter() - start:.0f} s |")
    print(lines[-1], flush=True)
    del model, small
out = pathlib.Path(__file__).parent / "results" / "torchvision_models.md"
if not sys.argv[1:]:
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")
