"""``finetune --cut STAGE``: the network truncated after a stage, with a new head.

On the CPU with random-init resnet18 / mobilenet_v2 on 32 px digit images, 1-2 epochs.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from click.testing import CliRunner

from featx.backbones import build_backbone
from featx.cli import main
from featx.config import ExtractConfig
from featx.data import load_dataset
from featx.extract import extract
from featx.finetune import build_model, cut_stages, data_from_spec, finetune, run_dir_name
from tests.builders import small_finetune_config as _cfg
from tests.builders import load_checkpoint as _load


def test_cut_at_the_last_stage_is_todays_finetuning(digits_dir, tmp_path):
    # resnet18's last stage is its last map and its head a global average pool: cut there,
    # the network is the whole one. 64 px: a 2x2 last map, on which another pooling differs
    data = data_from_spec(load_dataset(digits_dir), workers=0)
    plain = finetune(data, _cfg(tmp_path / "plain", augment=True, image_size=64))
    cut = finetune(data, _cfg(tmp_path / "cut", augment=True, image_size=64, cut="layer4"))
    a, b = _load(plain.run_dir / "best.pt")["model"], _load(cut.run_dir / "best.pt")["model"]
    assert list(a) == list(b)  # the same parameters and buffers under the same names
    # the same ops on the same data in one process; the tolerance only allows for a
    # different (but equally valid) kernel order the traced graph might pick
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    for r0, r1 in zip(plain.history, cut.history, strict=True):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert r1[key] == pytest.approx(r0[key], rel=1e-5, abs=1e-6), key
    assert cut.result["metrics"]["accuracy"] == plain.result["metrics"]["accuracy"]
    assert cut.result["metrics"]["roc_auc"] == pytest.approx(plain.result["metrics"]["roc_auc"],
                                                             rel=1e-5)
    assert cut.result["settings"]["forward_flops"] == plain.result["settings"]["forward_flops"]
    assert cut.result["settings"]["total_params"] == plain.result["settings"]["total_params"]
    # ... yet it is its own run and its own row
    assert cut.run_dir != plain.run_dir and "-at-layer4-" in cut.run_dir.name
    assert cut.result["cut"] == "layer4" and plain.result["cut"] is None
    assert cut.result["method"] == "finetune @ layer4 freeze=none loss=ce pool=1"
    assert cut.result["feature"] == "layer4.pool1"
    assert cut.result["repeat"]["experiment"] != plain.result["repeat"]["experiment"]


def test_cut_network_has_no_later_stages_and_never_runs_them():
    x = torch.randn(2, 3, 32, 32)
    whole = build_model("resnet18", "none", 3)
    model = build_model("resnet18", "none", 3, cut="layer2")
    kept = {name for name, _ in model.backbone.named_modules()}
    assert "layer2" in kept and not kept & {"layer3", "layer4", "fc", "avgpool"}
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model) < n(whole) / 5  # layer3 and layer4 hold ~94% of resnet18's weights

    # hooks on every module of the network before it is cut: what its forward calls
    backbone = build_backbone("resnet18", "none")
    calls: dict = {}
    for name, module in backbone.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(
                functools.partial(lambda name, *_: calls.update({name: calls.get(name, 0) + 1}),
                                  name))
    from featx.finetune.model import truncate
    out = truncate(backbone, "layer2")(x)["map"]
    assert any(k.startswith("layer2.") for k in calls)
    assert not [k for k in calls if k.startswith(("layer3.", "layer4.", "fc"))]
    # and what it computes is the whole network's layer2 output
    ref: dict = {}
    whole.backbone.layer2.register_forward_hook(lambda m, i, o: ref.update(out=o))
    whole.eval()(x)
    torch.testing.assert_close(model.eval().spatial_map(x), ref["out"])
    assert out.shape == ref["out"].shape


@pytest.mark.parametrize("name, pool", [("resnet18", 1), ("resnet18", 2), ("mobilenet_v2", 1)])
def test_head_reads_the_cut_layers_channels(name, pool):
    from featx.backbones import list_layers
    channels = {layer: shape[0] for layer, shape, _ in list_layers(name)}
    x = torch.randn(2, 3, 32, 32)
    for layer in cut_stages(name)[:3]:
        model = build_model(name, "none", 3, cut=layer, pool=pool).eval()
        assert model.head.in_features == channels[layer] * pool * pool
        assert model.spatial_map(x).shape[1] == channels[layer]
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("args, expected", [
    (["--cut", "layer9"], "'layer9' is not a stage of resnet18; use layer1, layer2, layer3, "
     "layer4"),
    (["--cut", "layer2", "--freeze", "layer3"], "is cut away by --cut layer2; use none, "
     "backbone, conv1, bn1, layer1, layer2"),
    (["--model", "timm:resnet18", "--cut", "layer9"], "is not a stage of timm:resnet18; use "
     "act1, layer1, layer2, layer3, layer4"),
])
def test_bad_cut_gives_one_line(digits_dir, tmp_path, args, expected):
    base = ["finetune", "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--workers", "0", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r"),
            "--data", str(digits_dir)]
    r = CliRunner().invoke(main, base + args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], r.output
    assert not list((tmp_path / "r").glob("*/result.json"))


def test_list_stages_shows_where_to_cut():
    r = CliRunner().invoke(main, ["finetune", "--model", "resnet18", "--list-stages"])
    assert r.exit_code == 0
    assert r.output.split()[:2] == ["none", "backbone"]  # the --freeze values come first
    cut = r.output.split("--cut accepts")[1].splitlines()[1:]
    assert cut == ["layer1  64x56x56", "layer2  128x28x28", "layer3  256x14x14",
                   "layer4  512x7x7"]


def test_cut_with_split_from_records_the_cut_and_its_cost(digits_dir, tmp_path):
    ex = extract(load_dataset(digits_dir), ExtractConfig(
        model="resnet18", weights="none", image_size=32, workers=0, out_dir=tmp_path / "cache",
        progress=False))
    base = ["finetune", "--model", "resnet18", "--weights", "none", "--split-from",
            str(ex.path), "--epochs", "1", "--image-size", "32", "--workers", "0",
            "--no-progress", "--out", str(tmp_path / "results")]
    results = {}
    for cut in ([], ["--cut", "layer3"]):
        r = CliRunner().invoke(main, base + cut)
        assert r.exit_code == 0, r.output
        results[bool(cut)] = json.loads(open(r.output.strip().splitlines()[-1]).read())
    whole, cut = results[False], results[True]
    assert cut["cut"] == "layer3" and cut["settings"]["cut"] == "layer3"
    assert cut["method"].startswith("finetune @ layer3 ")
    assert cut["dataset"] == whole["dataset"]  # the very split the cache's heads score
    assert cut["settings"]["total_params"] < whole["settings"]["total_params"]
    assert 0 < cut["settings"]["forward_flops"] < whole["settings"]["forward_flops"]
    # predict rebuilds the cut network from the result and scores as finetune scored
    from featx.apply import load_predictor
    from featx.results import finetune_result_path
    run_dir = next((tmp_path / "results").glob("*-at-layer3-*"))
    predictor = load_predictor(finetune_result_path(run_dir), device="cpu")
    assert predictor.network.cut == "layer3"
    # export checks its program against the eager (cut) network before writing it
    from featx.apply import export_result
    out, info = export_result(finetune_result_path(run_dir), tmp_path / "cut.pt2")
    assert out.is_file() and info["classes"] == cut["dataset"]["classes"]


def test_the_cut_is_part_of_the_run_identity(digits_dir, tmp_path):
    data = data_from_spec(load_dataset(digits_dir), workers=0)
    from featx.backbones import resolve_weights
    w = resolve_weights("resnet18", "none")
    names = {run_dir_name(data, _cfg(tmp_path, cut=c), w) for c in (None, "layer2", "layer3")}
    assert len(names) == 3
    # resume with another cut finds nothing to resume in the other's folder, and a checkpoint
    # with another cut is refused
    res = finetune(data, _cfg(tmp_path, epochs=1, cut="layer2"))
    from featx.errors import ParameterError
    from featx.finetune.checkpoints import load_resume
    with pytest.raises(ParameterError, match="cut: checkpoint 'layer2', now 'layer3'"):
        load_resume(res.run_dir / "last.pt", _cfg(tmp_path, epochs=1, cut="layer3",
                                                  resume=True), data)


def test_resume_of_a_cut_run_ends_like_an_uninterrupted_one(digits_dir, tmp_path):
    data = data_from_spec(load_dataset(digits_dir), workers=0)
    kw = dict(epochs=2, image_size=16, optimizer="sgd", lr=0.05, cut="layer3", freeze="layer1")
    full = finetune(data, _cfg(tmp_path / "full", **kw))

    def stop_after_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, _cfg(tmp_path / "part", **kw), on_epoch_end=stop_after_1)
    resumed = finetune(data, _cfg(tmp_path / "part", resume=True, **kw))
    assert resumed.resumed and resumed.run_dir.name == full.run_dir.name
    # one process, the same ops: the tolerance of tests/test_finetune.py's resume test
    for r0, r1 in zip(full.history, resumed.history, strict=True):
        assert r1["val_loss"] == pytest.approx(r0["val_loss"], rel=1e-5, abs=1e-6)
    wa, wb = _load(full.run_dir / "best.pt")["model"], _load(resumed.run_dir / "best.pt")["model"]
    assert not any(k.startswith("backbone.layer4.") for k in wa)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, cut, freeze, gone", [
    ("timm:resnet18", "layer2", "layer1", ("layer3.", "layer4.", "fc.")),
    ("timm:vit_tiny_patch16_224", "blocks.2", "stem", ("blocks.3.", "blocks.11.", "head.")),
])
def test_timm_models_are_cut_by_timms_own_pruning(name, cut, freeze, gone):
    from featx.backbones import list_layers
    from featx.backbones.layers import LayerFeatures, layer_plan
    from featx.backbones import FeatureModel, get_backbone
    whole = build_model(name, "none", 3, image_size=32)
    model = build_model(name, "none", 3, image_size=32, cut=cut, freeze=freeze)
    names = [n for n, _ in model.backbone.named_parameters()]
    assert not [n for n in names if n.startswith(gone)]
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in whole.parameters())
    channels = {layer: shape[0] for layer, shape, _ in list_layers(name)}[cut]
    assert model.head.in_features == channels
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(names)
    # the cut output is what extract stores for that layer (pool1), from the whole network
    x = torch.randn(2, 3, 32, 32)
    plan = layer_plan(name, (cut,), (1,), 32)
    ref = LayerFeatures(FeatureModel(get_backbone(name), whole.backbone.eval()), plan)(x)
    with torch.no_grad():
        got = model.eval().pool_layer(model.spatial_map(x)).flatten(1)
    torch.testing.assert_close(got, ref[f"{cut}.pool1"], rtol=1e-5, atol=1e-5)
    assert model(x).shape == (2, 3)
