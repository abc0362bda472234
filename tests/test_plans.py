"""Plans: costs, ranks, the layers they skip, their JSON, and the model they were made for."""
import html
import json

import pytest
import torch
import torch.nn as nn

import lowrank as lr


def test_plan_keeps_the_requested_share_of_parameters(resnet20):
    plan = lr.plan(resnet20, "svd", 0.5, exclude=["conv1", "linear"])
    assert plan.compressed() == [n for n in plan if n.startswith("layer")]
    for name, e in plan.items():
        assert e["params"][1] <= 0.5 * e["params"][0]
        # one rank more would exceed the share
        bigger = lr.plan(resnet20, "svd", {name: e["rank"] + 1}, include=[name])[name]
        assert bigger["params"][1] > 0.5 * e["params"][0]
    assert plan.params == lr.measure.params(lr.compress(resnet20, plan, progress=False))


def test_plan_costs_match_the_compressed_model(resnet20):
    for method in ["svd", "spatial", "tucker2", "cp"]:
        plan = lr.plan(resnet20, method, 0.3, include=["layer2.*", "linear"])
        small = lr.structure(resnet20, plan)
        assert plan.params == lr.measure.params(small)
        assert plan.macs == lr.measure.macs(small)


def test_rank_above_break_even_stays_dense_and_says_so(resnet20):
    plan = lr.plan(resnet20, "svd", 16, include=["layer1.0.conv1"])  # 16·(16·9 + 16) > 16·16·9
    e = plan["layer1.0.conv1"]
    assert e["method"] == "dense" and "parameters" in e["note"] and e["params"][0] == e["params"][1]
    assert plan.compressed() == []


def test_ranks_as_int_dict_and_rule(resnet20):
    assert lr.plan(resnet20, "tucker2", 8, include=["layer3.0.conv1"])["layer3.0.conv1"]["rank"] == [8, 8]
    assert lr.plan(resnet20, "tucker2", 20, include=["layer1.0.conv1"])["layer1.0.conv1"]["method"] == "dense"
    plan = lr.plan(resnet20, "svd", {"layer1.0.conv1": 3}, include=["layer1.0.*"])
    assert plan["layer1.0.conv1"]["rank"] == 3 and plan["layer1.0.conv2"]["method"] == "dense"
    rule = lambda layer: 2
    assert lr.plan(resnet20, "svd", rule, include=["linear"])["linear"]["rank"] == 2


def test_plan_json_round_trip_and_edit(resnet20):
    plan = lr.plan(resnet20, "tucker2", 0.4, exclude=["conv1"])
    again = lr.Plan.from_json(plan.to_json())
    assert again == plan and str(again) == str(plan)
    json.loads(plan.to_json())  # plain data
    again.edit("layer1.0.conv1", rank=[4, 4])
    assert again["layer1.0.conv1"]["rank"] == [4, 4] and again != plan
    assert again["layer1.0.conv1"]["params"][1] == 16 * 4 + 4 * 4 * 9 + 4 * 16
    again.edit("layer1.0.conv2", method="dense")
    assert "layer1.0.conv2" not in again.compressed()
    assert "layer1.0.conv1" in str(again) and "<table>" in again._repr_html_()


def test_bad_plans_raise(resnet20):
    with pytest.raises(ValueError, match="method"):
        lr.plan(resnet20, "qr", 0.5)
    with pytest.raises(ValueError, match="fraction"):
        lr.plan(resnet20, "svd", 1.5)
    with pytest.raises(ValueError, match="positive integer"):
        lr.plan(resnet20, "svd", 0)
    with pytest.raises(ValueError, match="not in the plan"):
        lr.plan(resnet20, "svd", {"layer9.conv": 3})
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        lr.plan(resnet20, "svd", 0.5, include=["nothing*"])
    grouped = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="1: grouped"):
        lr.plan(grouped, "svd", 0.5, include=["1"])
    plan = lr.plan(grouped, "svd", 0.5)
    assert list(plan) == ["0"] and "groups=2" in plan.skipped["1"]["reason"]


class Mixed(nn.Module):
    """One module of each kind a plan must account for: only `conv` and `head` can be factorized."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.even = nn.Conv2d(8, 8, 2, padding="same")            # pads 0 left, 1 right
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.special = nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.up(self.even(self.depthwise(self.conv(x))))     # [N, 8, 2H, 2W]
        t = self.conv1d(x.flatten(2)).transpose(1, 2)            # [N, 4HW, 8]
        t = self.special(self.attention(t, t, t)[0])
        return self.head(t.mean(1))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_every_layer_not_factorized_is_listed_with_its_reason():
    plan = lr.plan(Mixed(), "svd", 2, input_size=(3, 4, 4), exclude=["head"])
    assert plan.compressed() == ["conv"]
    reasons = {"depthwise": "grouped convolutions (groups=8)", "even": "padding='same' with an even effective kernel",
               "up": "ConvTranspose2d layers are not factorized",
               "conv1d": "Conv1d layers are not factorized", "special": "subclass of nn.Linear",
               "attention": "attention: nn.MultiheadAttention", "attention.out_proj": "projection inside",
               "unused": "not reached by the forward pass", "head": "matched by exclude"}
    assert list(plan.skipped) == list(reasons)
    text, page, data = str(plan), plan._repr_html_(), json.loads(plan.to_json())
    for name, reason in reasons.items():
        assert reason in plan.skipped[name]["reason"] and data["skipped"][name] == plan.skipped[name]
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert "skipped" in line and reason in line and html.escape(reason) in page
    assert plan.skipped["attention"]["weight"] == [24, 8] and plan.skipped["depthwise"]["type"] == "Conv2d"
    summary = "10 layers: 1 factorized, 9 kept dense (7 not supported, 1 not reached, 1 excluded)"
    assert text.splitlines()[-1].startswith(summary) and summary in page
    assert lr.Plan.from_json(plan.to_json()) == plan
    for name in ("depthwise", "up", "special"):
        with pytest.raises(ValueError, match=f"{name}: .*(grouped|not factorized|subclass)"):
            lr.plan(Mixed(), "svd", 2, input_size=(3, 4, 4), include=[name])
    with pytest.raises(ValueError, match="no entry 'depthwise': grouped"):
        plan.edit("depthwise", rank=2)
    assert lr.plan(Mixed(), "svd", 2, input_size=(3, 4, 4), include=["conv"]).skipped["head"]["kind"] == "excluded"


def test_dense_layers_of_the_plan_are_counted_in_the_summary(resnet20):
    plan = lr.plan(resnet20, "svd", {"layer1.0.conv1": 16, "layer1.0.conv2": 2}, include=["layer1.0.*"])
    assert plan.summary().startswith("20 layers: 1 factorized, 19 kept dense (1 no saving, 18 excluded)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_plan_probes_the_model_in_its_own_dtype(dtype):
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(),
                                 nn.Linear(16 * 30 * 30, 10))
    torch.manual_seed(0)
    model = make().to(dtype)
    plan = lr.plan(model, "tucker2", 0.5)
    torch.manual_seed(0)
    assert plan == lr.plan(make(), "tucker2", 0.5)   # the same costs as in float32
    small = lr.compress(model, plan, progress=False)
    assert all(p.dtype == dtype for p in small.parameters())
    assert lr.measure.macs(small) == plan.macs


def test_wrapped_and_scripted_models_are_refused_with_what_to_pass():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    plan = lr.plan(model, "svd", 2)
    for wrapped, hint in [(nn.DataParallel(model), "model.module"), (torch.compile(model), "model._orig_mod")]:
        for call in (lambda: lr.plan(wrapped, "svd", 2), lambda: lr.compress(wrapped, plan, progress=False),
                     lambda: lr.calibrate(wrapped, torch.randn(2, 3, 8, 8), progress=False)):
            with pytest.raises(TypeError, match=hint):
                call()
    with pytest.warns(FutureWarning):        # torch.jit.script is deprecated, and still used
        scripted = torch.jit.script(model)
    with pytest.raises(TypeError, match="TorchScript.*plan and compress the Python model"):
        lr.plan(scripted, "svd", 2)


def test_a_plan_is_refused_on_a_model_it_was_not_made_for(resnet20):
    """ResNet-32 has every layer of ResNet-20, under the same names and of the same shapes."""
    plan = lr.plan(resnet20, "svd", 0.5)
    with pytest.raises(ValueError, match="made for another model.*'layer1.3.conv1'.*lowrank.plan"):
        plan.check(lr.models.resnet32(pretrained=False))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    plan = lr.plan(model, "svd", 2)
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))   # same layers, one more parameter
    with pytest.raises(ValueError, match="model of 808 parameters, this one has 809"):
        plan.check(model)
    other = lr.plan(lr.models.resnet56(pretrained=False), "svd", 0.5)
    with pytest.raises(ValueError, match="does not have"):
        other.check(resnet20)
    wide = lr.plan(lr.models.resnet20(pretrained=False), "svd", 0.5)
    wide.layers["layer1.0.conv1"]["config"]["in_channels"] = 17
    with pytest.raises(ValueError, match="does not match"):
        wide.check(resnet20)


def test_entries_edited_by_hand_get_their_costs_recomputed(resnet20):
    plan = lr.plan(resnet20, "svd", 0.5, exclude=["conv1", "linear"])
    plan["layer1.0.conv1"]["rank"] = 2
    plan.layers["layer2.0.conv1"] = {**plan["layer2.0.conv1"], "method": "tucker2", "rank": [4, 4]}
    plan["layer3.0.conv1"]["method"] = "dense"
    assert plan["layer1.0.conv1"]["params"][1] != 2 * (16 + 144)     # not until the plan reports
    small = lr.structure(resnet20, plan)
    assert plan.params == lr.measure.params(small) and plan.macs == lr.measure.macs(small)
    assert plan["layer1.0.conv1"]["params"][1] == 2 * (16 + 144)  # no bias
    assert plan["layer3.0.conv1"]["params"] == [18432, 18432]
    again = lr.Plan.from_json(plan.to_json())
    assert again == plan and "2,304 → 320" in str(again)


def test_plans_edited_into_nonsense_say_which_layer_and_what_to_do(resnet20):
    for field, value, message in [("rank", [32], r"layer2.0.conv1 \(tucker2, rank \[32\]\): a tucker2 rank is an "
                                                 r"int or a pair \[rT, rS\], got \[32\]; change it with plan.edit"),
                                  ("rank", [300, 2], r"layer2.0.conv1 \(tucker2.*output rank must be between 1 and "
                                                     r"32, got 300"),
                                  ("method", "tucker3", r"layer2.0.conv1: unknown method 'tucker3' for a Conv2d")]:
        plan = lr.plan(resnet20, "tucker2", 0.5)
        plan["layer2.0.conv1"][field] = value
        for call in (lambda: print(plan), lambda: lr.compress(resnet20, plan, progress=False)):
            with pytest.raises(ValueError, match=message):
                call()
    text = json.loads(lr.plan(resnet20, "svd", 0.5).to_json())
    del text["norm"]
    with pytest.raises(ValueError, match=r"not a lowrank plan: the JSON lacks \['norm'\]"):
        lr.Plan.from_json(json.dumps(text))
    text["norm"] = "frobenius"
    del text["layers"]["linear"]["config"]
    with pytest.raises(ValueError, match=r"linear: the plan entry lacks \['config'\]"):
        lr.Plan.from_json(json.dumps(text))
    partial = lr.plan(resnet20, "svd", {"layer1.0.conv1": 2}, include=["layer1.0.*"])
    with pytest.raises(ValueError, match=r"layer1.0.conv2: give a rank \(plan.edit"):
        partial.edit("layer1.0.conv2", method="tucker2")
    with pytest.raises(ValueError, match="a svd rank is one integer"):
        lr.plan(resnet20, "svd", 0.5).edit("layer1.0.conv1", rank=[2, 2])
    with pytest.raises(ValueError, match="spatial SVD has no data-informed version"):
        lr.plan(resnet20, "spatial", 0.5, norm="data")


@pytest.mark.parametrize("ranks", [4, lr.ranks.energy(0.9), lr.ranks.budget(0.5)])
def test_non_finite_weights_are_refused_with_the_layer_name(ranks):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^1: the weight or bias holds NaN or infinite values.*exclude=\['1'\]"):
        lr.plan(model, "svd", ranks)
    assert lr.plan(model, "svd", ranks, exclude=["1"]).compressed() == ["0"]
