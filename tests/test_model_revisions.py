"""Model ids take a pinned `revision`, which is part of what a stage's output is fingerprinted on, and
remote code from a hub model id runs only pinned unless `allow_unpinned_remote_code` says otherwise."""

from __future__ import annotations

import pytest

from tasks.caption.stage import CaptionStage
from tasks.config import ConfigError, load_config
from tasks.engine.manifest import stage_fingerprint
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.eval.stage import EvalStage
from tasks.filter.stage import FilterStage
from tasks.grpo.stage import GRPOStage
from tasks.sft.stage import SFTStage

HUB_ID = "Efficient-Large-Model/NVILA-8B-Video"


@pytest.mark.parametrize(
    "section, overrides",
    [
        ("caption", {"caption.backend": "vllm", "caption.model": HUB_ID, "caption.trust_remote_code": True}),
        ("filter", {"filter.model": HUB_ID, "filter.trust_remote_code": True}),
        ("eval", {"eval.models": ["base", "sft", HUB_ID], "eval.trust_remote_code": True}),
    ],
)
def test_remote_code_from_an_unpinned_model_id_is_refused_unless_allowed(section, overrides):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    message = str(err.value)
    assert f"{section}: " in message and HUB_ID in message and "`revision`" in message and "allow_unpinned_remote_code" in message
    pinned = load_config("tiny", {**overrides, f"{section}.revision": "0123abcd"})
    assert getattr(pinned, section).revision == "0123abcd"
    assert getattr(load_config("tiny", {**overrides, f"{section}.allow_unpinned_remote_code": True}), section).trust_remote_code


def test_remote_code_from_local_folders_and_tiny_needs_no_revision(tmp_path):
    folder = tmp_path / "nvila-snapshot"
    folder.mkdir()
    cfg = load_config("tiny", {
        "caption.model": str(folder), "caption.trust_remote_code": True, "filter.trust_remote_code": True,
        "eval.models": ["base", "grpo", str(folder)], "eval.trust_remote_code": True,
    })
    assert cfg.caption.revision is None and cfg.filter.model == "tiny-captioner"
    # Without remote code an unpinned id is accepted (transformers refuses to run code it was not allowed to).
    assert load_config("tiny", {"filter.model": HUB_ID}).filter.revision is None


def _fingerprint(stage, root, overrides) -> str:
    ctx = StageContext(Workdir(str(root)), load_config("tiny", overrides))
    return stage_fingerprint(stage.name, stage.settings(ctx), {}, stage.code_version)


@pytest.mark.parametrize("stage", [CaptionStage(), FilterStage(), SFTStage(), GRPOStage(), EvalStage()], ids=lambda s: s.name)
def test_two_revisions_give_two_fingerprints(tmp_path, stage):
    base = {f"{stage.name}.model" if stage.name != "eval" else "eval.models": HUB_ID if stage.name != "eval" else ["base", HUB_ID]}
    prints = {rev: _fingerprint(stage, tmp_path, {**base, f"{stage.name}.revision": rev}) for rev in ("v1.0", "0123abcd", None)}
    assert len(set(prints.values())) == 3
    allowed = _fingerprint(stage, tmp_path, {**base, f"{stage.name}.revision": "v1.0", f"{stage.name}.allow_unpinned_remote_code": True}) \
        if stage.name in ("caption", "filter", "eval") else prints["v1.0"]
    assert allowed == prints["v1.0"]  # a permission, not a recipe


def test_the_base_models_revision_reaches_the_stages_that_use_it(tmp_path):
    """grpo.model=base is filter.model and eval's `base` is filter.model: filter.revision changes
    both; and it is one of the settings a filter shard's answers depend on."""
    pinned, other = ({"filter.model": HUB_ID, "filter.revision": rev, "grpo.model": "base"} for rev in ("v1.0", "v2.0"))
    for stage in (GRPOStage(), EvalStage()):
        assert _fingerprint(stage, tmp_path, pinned) != _fingerprint(stage, tmp_path, other)
    ctx = StageContext(Workdir(str(tmp_path)), load_config("tiny", pinned))
    assert FilterStage().shard_settings(ctx)["revision"] == "v1.0"


def test_a_new_build_of_a_local_model_gives_new_fingerprints(tmp_path, monkeypatch):
    """`tiny-captioner` names a model built here, whose weights follow from its pretraining recipe: a
    stage that used one build must not be reused as cached with another (the name alone was hashed, so
    a workdir kept the captions, labels and answers of the previous recipe's model)."""
    from models.tiny import PRETRAIN_STEPS_ENV

    stages = (CaptionStage(), FilterStage(), SFTStage(), GRPOStage(), EvalStage())
    overrides = {"grpo.model": "base"}  # the base model straight, not through the SFT stage's output
    monkeypatch.delenv(PRETRAIN_STEPS_ENV, raising=False)
    before = [_fingerprint(stage, tmp_path, overrides) for stage in stages]
    shards_before = FilterStage().shard_settings(StageContext(Workdir(str(tmp_path)), load_config("tiny")))
    monkeypatch.setenv(PRETRAIN_STEPS_ENV, "7")
    after = [_fingerprint(stage, tmp_path, overrides) for stage in stages]
    assert all(a != b for a, b in zip(before, after))
    assert FilterStage().shard_settings(StageContext(Workdir(str(tmp_path)), load_config("tiny"))) != shards_before  # no shard reused
    # Models not built here keep the fingerprints they had: no rerun of existing workdirs.
    hub = load_config("tiny", {"caption.model": HUB_ID, "filter.model": HUB_ID, "sft.model": HUB_ID})
    assert not any("local_builds" in getattr(hub, s).output_settings() for s in ("caption", "filter", "sft", "grpo", "eval"))
