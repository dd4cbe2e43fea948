from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config, normalise_overrides


def test_builtin_configs_validate():
    tiny = load_config("tiny")
    prod = load_config("longvila-r1")
    assert tiny.profile == "tiny" and tiny.caption.model == "tiny-captioner" and tiny.qa.backend == "template"
    assert prod.caption.trust_remote_code and "NVILA" in prod.caption.model
    assert prod.qa.backend == "openai" and prod.qa.api_key_env == "DEEPSEEK_API_KEY"
    assert prod.filter.backend == "vllm" and prod.grpo.rollout_engine == "vllm"


def test_production_sequence_parallelism_fits_the_production_model():
    """Qwen2.5-VL-7B has 28 attention heads and 4 KV heads (its config.json): Ulysses must split both."""
    from parallel.topology import sp_layout
    from parallel.topology import kv_repeat_factor

    prod = load_config("longvila-r1")
    for section in (prod.sft, prod.grpo):
        kv_repeat_factor(28, 4, section.sp_degree)  # raises when the heads do not split
        sp_layout(section.procs_per_node * section.nnodes, section.sp_degree)
    assert prod.grpo.precision == "bf16" and prod.grpo.gradient_checkpointing
    with pytest.raises(ValueError, match="28 attention heads do not divide over sp_degree=8"):
        kv_repeat_factor(28, 4, 8)  # what the profile had


def test_overrides_parse_as_yaml_scalars():
    cfg = load_config("tiny", ["clip.seconds=8", "clip.mode=exact", "execution.shard_workers=3", "clip.extensions=[.mp4]"])
    assert cfg.clip.seconds == 8.0 and cfg.clip.mode == "exact" and cfg.execution.shard_workers == 3
    assert cfg.clip.extensions == [".mp4"]
    assert normalise_overrides({"clip.seconds": 4}) == {"clip.seconds": 4}


def test_unknown_override_names_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["clip.secnds=8"])
    assert "clip.secnds" in str(err.value) and "seconds" in str(err.value) and "min_seconds" in str(err.value)


def test_unknown_section_names_sections():
    with pytest.raises(ConfigError, match="valid keys: profile, source, execution, clip"):
        load_config("tiny", ["clp.seconds=8"])


def test_bad_value_names_expected_type():
    with pytest.raises(ConfigError, match=r"clip\.seconds: Input should be a valid number"):
        load_config("tiny", ["clip.seconds=ten"])
    with pytest.raises(ConfigError, match=r"clip\.mode: Input should be 'copy' or 'exact'"):
        load_config("tiny", ["clip.mode=fast"])
    with pytest.raises(ConfigError, match="must not exceed"):
        load_config("tiny", ["clip.min_seconds=20"])


def test_malformed_override_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["clip.seconds"])
    with pytest.raises(ConfigError, match="built-in configs: .*tiny"):
        load_config(str(tmp_path / "nope.yaml"))


def test_unknown_key_in_yaml_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("clip:\n  seconds: 5\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'clip.bogus'; valid keys under clip: seconds"):
        load_config(str(path))


def test_output_settings_are_plain_json_without_runtime_keys():
    cfg = load_config("tiny")
    settings = cfg.clip.output_settings()
    assert settings["seconds"] == 10.0 and "shard_size" not in settings
    qa = cfg.qa.output_settings()
    assert "base_url" not in qa and "concurrency" not in qa and qa["model"] == cfg.qa.model
    # The judge: which model decides, not where it is reached or how hard it is pushed.
    judge = load_config("tiny", ["judge.model=j", "judge.base_url=http://x/v1", "judge.concurrency=4"]).judge
    assert judge.output_settings() == {"model": "j"} and load_config("tiny").judge.model is None  # tiny has no judge


@pytest.mark.parametrize("key", ["caption.model", "qa.backend", "filter.model", "sft.model"])
def test_a_choice_without_a_safe_default_is_required(tmp_path, key):
    """No toy hides in the schema: omitting a model or the QA backend is an error naming the key and its
    choices, not the random tiny model or the offline template backend."""
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text())
    section, name = key.split(".")
    del data[section][name]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"{key}: missing, and it has no default\. Required: .*'?tiny'?|{key}: missing, and it has no default\. Required: openai"):
        load_config(str(path))



def test_a_num_frames_override_replaces_the_profiles_fps_sampling():
    from models.video import FrameSampling

    assert load_config("tiny").eval.fps == 0.2  # the tiny profile samples by fps
    cfg = load_config("tiny", ["eval.num_frames=32"])
    assert cfg.eval.fps is None and cfg.eval.frame_sampling() == FrameSampling(num_frames=32)
    assert cfg.sft.fps == 0.2  # only the section overridden
    both = load_config("tiny", {"eval.num_frames": 32, "eval.fps": 0.5}).eval  # both named: fps still wins
    assert both.frame_sampling().fps == 0.5
