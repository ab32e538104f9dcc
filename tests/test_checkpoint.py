"""Checkpoint loading: Kimi-VL, Kimi-K2.5 and standalone MoonViT layouts, sharded or not, and one clear error."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from moonvit_fixtures import kimi_vl_config_json, random_model, random_pixels, tiny_config, write_checkpoint
from fused_moonvit.moonvit import CheckpointError, MoonVitConfig, MoonVitReference, build_model, check_model_dir


def _kimi_tensors(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = dict(model.state_dict())
    # a language model the loader must leave unread
    tensors["language_model.model.embed_tokens.weight"] = torch.randn(10, 6, generator=g)
    return tensors


@pytest.mark.parametrize("shards", [1, 3])
def test_load_kimi_vl_checkpoint(tmp_path, shards):
    cfg = tiny_config()
    src = random_model(cfg, seed=11)
    write_checkpoint(tmp_path, _kimi_tensors(src), kimi_vl_config_json(cfg), shards=shards)
    assert MoonVitConfig.from_pretrained(tmp_path).to_dict()["text_hidden_size"] == 24
    loaded = build_model(MoonVitReference, tmp_path, seed=99)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    grids = torch.tensor([[4, 6]])
    torch.testing.assert_close(loaded(random_pixels([(4, 6)]), grids), src(random_pixels([(4, 6)]), grids))


def test_load_into_bf16_converts(tmp_path):
    cfg = tiny_config()
    src = random_model(cfg, seed=12)
    write_checkpoint(tmp_path, dict(src.state_dict()), kimi_vl_config_json(cfg))
    loaded = build_model(MoonVitReference, tmp_path, dtype=torch.bfloat16)
    w = "vision_tower.encoder.blocks.1.wqkv.weight"
    assert loaded.state_dict()[w].dtype == torch.bfloat16
    assert torch.equal(loaded.state_dict()[w], src.state_dict()[w].bfloat16())


@pytest.mark.parametrize("prefixed", [False, True])
def test_standalone_moonvit_tower_only(tmp_path, prefixed):
    cfg = tiny_config(text_hidden_size=None)
    src = random_model(cfg, seed=13)
    tensors = {(k if prefixed else k.removeprefix("vision_tower.")): v for k, v in src.state_dict().items()}
    standalone = {k: getattr(cfg, k) for k in MoonVitConfig._FIELDS if k != "text_hidden_size"}
    write_checkpoint(tmp_path, tensors, dict(standalone, model_type="moonvit"), shards=2)
    loaded = build_model(MoonVitReference, tmp_path)
    assert loaded.multi_modal_projector is None
    out = loaded(random_pixels([(2, 4)]), torch.tensor([[2, 4]]))
    assert out.shape == (2, 4 * cfg.hidden_size)
    torch.testing.assert_close(out, src(random_pixels([(2, 4)]), torch.tensor([[2, 4]])))


def test_tower_only_model_ignores_projector_of_kimi_checkpoint(tmp_path):
    cfg = tiny_config()
    src = random_model(cfg, seed=14)
    write_checkpoint(tmp_path, _kimi_tensors(src), kimi_vl_config_json(cfg))
    tower = build_model(MoonVitReference, tmp_path, config=tiny_config(text_hidden_size=None))
    assert torch.equal(tower.state_dict()["vision_tower.encoder.final_layernorm.weight"],
                       src.state_dict()["vision_tower.encoder.final_layernorm.weight"])


def test_one_error_lists_every_bad_key(tmp_path):
    cfg = tiny_config()
    tensors = dict(random_model(cfg, seed=15).state_dict())
    del tensors["vision_tower.encoder.blocks.0.wo.bias"]
    del tensors["multi_modal_projector.linear_2.weight"]
    tensors["vision_tower.encoder.blocks.0.mlp.fc0.weight"] = torch.randn(7, 32)
    tensors["vision_tower.encoder.blocks.9.wqkv.weight"] = torch.randn(3, 3)
    write_checkpoint(tmp_path, tensors, kimi_vl_config_json(cfg), shards=2)
    model = random_model(cfg, seed=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        from fused_moonvit.moonvit import load_encoder_state
        load_encoder_state(model, tmp_path)
    msg = str(err.value)
    for needle in ["2 missing", "blocks.0.wo.bias", "linear_2.weight", "1 unexpected", "blocks.9.wqkv.weight",
                   "1 misshaped", "mlp.fc0.weight: checkpoint (7, 32), model (48, 32)"]:
        assert needle in msg, needle
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "nothing may be written"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MoonVitConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(kimi_vl_config_json(tiny_config())))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        build_model(MoonVitReference, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        build_model(MoonVitReference, tmp_path)


def test_config_round_trip(tmp_path):
    cfg = tiny_config()
    cfg.save_pretrained(tmp_path)
    back = MoonVitConfig.from_pretrained(tmp_path)
    assert all(getattr(back, k) == getattr(cfg, k) for k in MoonVitConfig._FIELDS)


def test_duplicate_and_absent_keys_are_named(tmp_path):
    cfg = tiny_config(text_hidden_size=None)
    tensors = dict(random_model(cfg, seed=17).state_dict())
    # a tower checkpoint holding one tensor with and without the prefix
    tensors["encoder.final_layernorm.bias"] = tensors["vision_tower.encoder.final_layernorm.bias"].clone()
    standalone = {k: getattr(cfg, k) for k in MoonVitConfig._FIELDS if k != "text_hidden_size"}
    write_checkpoint(tmp_path / "dup", tensors, standalone)
    with pytest.raises(CheckpointError, match="1 given twice:\n  vision_tower.encoder.final_layernorm.bias"):
        build_model(MoonVitReference, tmp_path / "dup")

    full = tiny_config()
    write_checkpoint(tmp_path / "idx", dict(random_model(full, seed=18).state_dict()), kimi_vl_config_json(full),
                     shards=2)
    index_path = tmp_path / "idx" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "vision_tower.encoder.blocks.0.wo.bias"
    index["weight_map"][name] = "model-00002-of-00002.safetensors" if index["weight_map"][name].startswith(
        "model-00001") else "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"absent from their shard:\n  {name}"):
        build_model(MoonVitReference, tmp_path / "idx")


def test_bad_checkpoint_fails_before_the_model_is_built(tmp_path):
    cfg = tiny_config()
    tensors = dict(random_model(cfg, seed=19).state_dict())
    del tensors["vision_tower.encoder.blocks.1.norm0.bias"]
    write_checkpoint(tmp_path, tensors, kimi_vl_config_json(cfg))
    built = []

    class Recording(MoonVitReference):
        def __init__(self, config):
            super().__init__(config)
            built.append(self.device.type)

    with pytest.raises(CheckpointError) as err:
        build_model(Recording, tmp_path)
    assert built == ["meta"], "only the parameters' layout may be made, on the meta device"
    assert err.value.one_line() == (f"checkpoint '{tmp_path}' does not match the model: "
                                    f"1 missing (vision_tower.encoder.blocks.1.norm0.bias)")
    with pytest.raises(CheckpointError, match="1 missing"):
        check_model_dir(tmp_path)


def test_one_line_counts_what_it_does_not_name():
    err = CheckpointError("checkpoint 'x' does not match the model",
                          {"missing": ["a", "b", "c", "d", "e"], "unexpected": ["f"]})
    assert str(err) == ("checkpoint 'x' does not match the model:\n5 missing:\n  a\n  b\n  c\n  d\n  e\n"
                        "1 unexpected:\n  f")
    assert err.one_line(2) == "checkpoint 'x' does not match the model: 5 missing (a, b and 3 more); 1 unexpected (f)"


# --- Kimi-K2.5 / K2.6 (MoonViT3d): vision_tower.* and mm_projector.*, config.json in the Hub's layout ---

from moonvit_fixtures import kimi_k25_config_json, tiny_k25_config, write_k25_checkpoint  # noqa: E402
from fused_moonvit.moonvit import checkpoint as checkpoint_module  # noqa: E402


class _ReadLog:
    """Wraps safe_open: records each file opened and each tensor whose data or shape is read."""

    def __init__(self, monkeypatch):
        self.opened, self.read = [], []
        real = checkpoint_module.safe_open
        log = self

        class Handle:
            def __init__(self, path, **kwargs):
                log.opened.append(os.path.basename(path))
                self._f = real(path, **kwargs)

            def __enter__(self):
                self._f.__enter__()
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def keys(self):
                return self._f.keys()

            def get_slice(self, name):
                log.read.append(name)
                return self._f.get_slice(name)

            def get_tensor(self, name):
                log.read.append(name)
                return self._f.get_tensor(name)

        monkeypatch.setattr(checkpoint_module, "safe_open", Handle)


def _add_language_model_shard(model_dir, seed):
    """Adds a shard holding only language-model tensors to the index, as Kimi-K2.5's 62 such shards."""
    g = torch.Generator().manual_seed(seed)
    save_file({"language_model.model.layers.0.mlp.gate.weight": torch.randn(8, 24, generator=g),
               "language_model.model.norm.weight": torch.randn(24, generator=g)},
              os.path.join(model_dir, "model-lm.safetensors"))
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    index = json.loads(open(index_path).read())
    index["weight_map"].update({"language_model.model.layers.0.mlp.gate.weight": "model-lm.safetensors",
                                "language_model.model.norm.weight": "model-lm.safetensors"})
    with open(index_path, "w") as f:
        json.dump(index, f)


def test_kimi_k25_config_from_the_hub_layout(tmp_path):
    cfg = tiny_k25_config()
    (tmp_path / "config.json").write_text(json.dumps(kimi_k25_config_json(cfg)))
    read = MoonVitConfig.from_pretrained(tmp_path)
    assert {k: getattr(read, k) for k in MoonVitConfig._FIELDS} == {k: getattr(cfg, k) for k in MoonVitConfig._FIELDS}
    assert (read.tower, read.max_frames, read.projector_name) == ("moonvit3d", 4, "mm_projector")
    assert (read.hidden_size, read.num_attention_heads, read.text_hidden_size) == (32, 4, 24)


def test_kimi_k25_config_as_transformers_writes_it(tmp_path):
    """transformers' own Kimi_K25Config (pos_emb_* and plain names) reads to the same model."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Kimi_K25Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Kimi_K25Config")
    cfg = tiny_k25_config()
    hf = transformers.Kimi_K25Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           pos_emb_height=16, pos_emb_width=16, pos_emb_time=4),
        text_config=dict(model_type="deepseek_v3", hidden_size=24, num_hidden_layers=1, vocab_size=64))
    hf.save_pretrained(tmp_path)
    read = MoonVitConfig.from_pretrained(tmp_path)
    assert {k: getattr(read, k) for k in MoonVitConfig._FIELDS} == {k: getattr(cfg, k) for k in MoonVitConfig._FIELDS}


@pytest.mark.parametrize("shards", [1, 3])
def test_load_kimi_k25_checkpoint_reads_only_the_encoder(tmp_path, monkeypatch, shards):
    cfg = tiny_k25_config()
    src = write_k25_checkpoint(tmp_path, cfg, seed=41, shards=shards)
    if shards > 1:
        _add_language_model_shard(tmp_path, seed=42)
    log = _ReadLog(monkeypatch)
    loaded = build_model(MoonVitReference, tmp_path, seed=99)
    assert loaded.mm_projector is loaded.projector and not hasattr(loaded, "multi_modal_projector")
    state = loaded.state_dict()
    assert set(state) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(state[k], v), k
    assert log.read and all(n.startswith(("vision_tower.", "mm_projector.")) for n in log.read), log.read
    assert "model-lm.safetensors" not in log.opened
    if shards > 1:
        assert set(log.opened) == {f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)}
    grid = torch.tensor([[4, 2, 4], [1, 4, 6]])
    pixels = random_pixels([(4, 2, 4), (1, 4, 6)], seed=3)
    torch.testing.assert_close(loaded(pixels, grid), src(pixels, grid), rtol=0, atol=0)


def test_kimi_k25_checkpoint_errors_name_every_key(tmp_path):
    cfg = tiny_k25_config()
    model = random_model(cfg, seed=43)
    tensors = dict(model.state_dict())
    del tensors["mm_projector.proj.2.bias"]
    tensors["mm_projector.proj.0.weight"] = torch.randn(5, 5)
    tensors["mm_projector.proj.1.weight"] = torch.randn(3)
    tensors["language_model.model.norm.weight"] = torch.randn(3)
    write_checkpoint(tmp_path, tensors, kimi_k25_config_json(cfg), shards=2)
    with pytest.raises(CheckpointError) as err:
        check_model_dir(tmp_path)
    assert err.value.problems == {
        "missing": ["mm_projector.proj.2.bias"], "unexpected": ["mm_projector.proj.1.weight"],
        "misshaped": ["mm_projector.proj.0.weight: checkpoint (5, 5), model (128, 128)"]}


def test_kimi_vl_config_over_a_kimi_k25_checkpoint_says_so(tmp_path):
    k25 = tiny_k25_config()
    write_k25_checkpoint(tmp_path, k25, seed=44)
    (tmp_path / "config.json").write_text(json.dumps(kimi_vl_config_json(tiny_config())))
    with pytest.raises(CheckpointError) as err:
        check_model_dir(tmp_path)
    assert sorted(err.value.problems) == ["missing", "unexpected"]
    assert all(k.startswith("multi_modal_projector.") for k in err.value.problems["missing"])
    assert len(err.value.problems["unexpected"]) == 6
    assert all(k.startswith("mm_projector.") for k in err.value.problems["unexpected"])
    assert "its projector is mm_projector.*" in err.value.summary and "multi_modal_projector." in err.value.summary


def test_moonvit3d_tower_alone_leaves_the_projector(tmp_path):
    cfg = tiny_k25_config()
    src = write_k25_checkpoint(tmp_path, cfg, seed=45)
    tower = build_model(MoonVitReference, tmp_path, config=tiny_k25_config(text_hidden_size=None))
    assert tower.projector is None
    assert set(tower.state_dict()) == {k for k in src.state_dict() if k.startswith("vision_tower.")}
    for k, v in tower.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_projector_name_must_be_known(tmp_path):
    write_k25_checkpoint(tmp_path, tiny_k25_config(), seed=46)
    with pytest.raises(ValueError, match="projector_name must be one of multi_modal_projector, mm_projector, "
                                         "got 'projector'"):
        checkpoint_module.match_checkpoint(tmp_path, {"vision_tower.x": (1,)}, "projector")
