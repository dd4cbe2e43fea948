"""The filter exports, each read by its consumer's own code where it is on PyPI.

- `longvideo-reason/` and `easyr1/`: loaded the way Long-RL's and EasyR1's `RLHFDataset` load a
  folder (`datasets.load_dataset(<type of the folder's first file>, data_dir=..., split=...)`), and
  scored with the `mathruler` grader both trainers' video reward (`r1v`) uses.
- `trl/`: trained on for two steps by TRL's `SFTTrainer` on the tiny Qwen2.5-VL, after TRL's own
  chat-template code rendered the prompt/completion pairs; the video preprocessing is the project's
  (`models.video`), since transformers' Qwen video processor needs torchvision.
- `llava/`: parsed with the rules of LLaVA's conversation preprocessing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
import jinja2
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from mathruler.grader import grade_answer

from models.tiny import VIDEO_PAD, ensure_tiny_model
from models.video import FrameSampling, build_video_inputs
from tasks.filter.exports import EASYR1_FORMAT_PROMPT_FILE, MANIFEST_FILE, common_video_dir, write_exports
from tasks.grading.prompts import MULTIPLE_CHOICE, OPEN_ENDED, user_prompt
from tasks.media.frames import read_video_frames
from tasks.sft.data import IGNORE_INDEX, collate
from tests.support.videos import make_video

OPTIONS = ["the red car", "the blue car", "a dog", "nobody"]
# (qa_id, video, question type, answer, split): every filter split, both question types.
ITEMS = [
    ("q0", "a", MULTIPLE_CHOICE, "B", "sft"),
    ("q1", "b", OPEN_ENDED, "The blue car", "sft"),
    ("q2", "a", MULTIPLE_CHOICE, "C", "rl"),
    ("q3", "b", OPEN_ENDED, "two people", "rl"),
    ("q4", "b", MULTIPLE_CHOICE, "A", "eval"),
    ("q5", "a", OPEN_ENDED, "at the end", "eval"),
    ("q6", "a", MULTIPLE_CHOICE, "D", "unused"),
]
WRONG = {MULTIPLE_CHOICE: "E", OPEN_ENDED: "a green bicycle"}
# What Long-RL and EasyR1 run on a folder: its splits, named as `datasets` infers them from file names.
TRAINER_SPLITS = {"train": {"q2", "q3"}, "validation": {"q4", "q5"}, "test": {"q4", "q5"}}


def reasoning(qa_id: str) -> str:
    return f"At 00:0{qa_id[1]} the red car enters; then the blue car leaves the street."


def filter_row(qa_id: str, video_uri: str, question_type: str, answer: str, split: str) -> dict:
    options = OPTIONS if question_type == MULTIPLE_CHOICE else None
    question = f"What happens in scene {qa_id}?"
    return {
        "qa_id": qa_id, "video_id": Path(video_uri).stem, "video_uri": video_uri, "category": "Temporal",
        "question_type": question_type, "question": question, "options": options, "answer": answer,
        "prompt": user_prompt(question, question_type, options),
        "target": f"<think>{reasoning(qa_id)}</think><answer>{answer}</answer>",
        "difficulty": "medium", "pass_rate": 0.4, "split": split,
    }


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "a": str(make_video(root / "street" / "a.mp4", 1, size="64x48", audio=False)),
        "b": str(make_video(root / "park" / "b.mp4", 1, size="64x48", audio=False, source="smptebars")),
    }


@pytest.fixture(scope="module")
def rows(videos) -> list[dict]:
    return [filter_row(q, videos[v], t, a, s) for q, v, t, a, s in ITEMS]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, rows) -> Path:
    out = tmp_path_factory.mktemp("filter") / "_exports"
    write_exports(LocalFileSystem(), str(out), rows)
    return out


def load_folder(folder: Path, split: str) -> datasets.Dataset:
    """How Long-RL's and EasyR1's `RLHFDataset` load `data.train_files=<folder>@<split>`: the file
    type is the extension of the folder's first entry, the split one that `datasets` infers."""
    file_type = os.path.splitext(os.listdir(folder)[0])[-1][1:]
    return datasets.load_dataset(file_type, data_dir=str(folder), split=split)


def r1v_accuracy(response: str, ground_truth: str, *, drop_spaces: bool) -> bool:
    """The accuracy half of the `r1v` reward both trainers' video examples use: the response's
    `<answer>` text graded against the ground truth with mathruler (Long-RL first deletes every
    space and newline of the response)."""
    if drop_spaces:
        response = response.replace("\n", "").replace(" ", "")
    found = re.search(r"<answer>(.*?)</answer>", response)
    return grade_answer(found.group(1).strip() if found else response.strip(), ground_truth.strip())


def response(answer: str) -> str:
    return f"<think>I watch the video.</think>\n<answer>{answer}</answer>"


def test_video_dir_is_the_deepest_common_folder():
    assert common_video_dir(["/data/src/street/a.mp4", "/data/src/park/b.mp4"]) == "/data/src"
    assert common_video_dir(["/data/src/a.mp4"]) == "/data/src"
    assert common_video_dir(["s3://bucket/src/a.mp4", "s3://bucket/src/x/b.mp4"]) == "s3://bucket/src"
    assert common_video_dir(["s3://one/a.mp4", "s3://two/b.mp4"]) is None
    assert common_video_dir(["s3://one/a.mp4", "/local/b.mp4"]) is None
    assert common_video_dir([]) is None


def test_manifest_names_every_file_and_the_video_folder(exports, videos):
    manifest = json.loads((exports / MANIFEST_FILE).read_text())
    assert manifest["video_dir"] == os.path.dirname(os.path.dirname(videos["a"]))
    for fmt, files in manifest["files"].items():
        assert all((exports / path).is_file() for path in files.values()), fmt
    assert manifest["filter_splits"]["longvideo-reason"] == {"train": "rl", "validation": "eval", "test": "eval"}
    assert manifest["filter_splits"]["trl"] == {"sft": "sft", "rl": "rl", "eval": "eval"}


def test_longvideo_reason_loads_as_long_rl_reads_it_and_its_answers_score(exports, rows):
    video_dir = json.loads((exports / MANIFEST_FILE).read_text())["video_dir"]
    by_id = {r["qa_id"]: r for r in rows}
    folder = exports / "longvideo-reason"
    for split, members in TRAINER_SPLITS.items():
        data = load_folder(folder, split)
        assert set(data["qa_id"]) == members
        for sample in data:
            row = by_id[sample["qa_id"]]
            # Long-RL asserts `videos` is one path string and joins it with data.video_dir.
            assert isinstance(sample["videos"], str) and not os.path.isabs(sample["videos"])
            assert os.path.join(video_dir, sample["videos"]) == row["video_uri"]
            assert "<video>" not in sample["problem"] and row["question"] in sample["problem"]
            assert sample["reasoning"] == reasoning(row["qa_id"])
            # The ground truth is the bare answer: the right answer scores, a wrong one does not.
            assert sample["answer"] == row["answer"]
            assert grade_answer(sample["answer"], sample["answer"])
            assert r1v_accuracy(response(row["answer"]), sample["answer"], drop_spaces=True)
            assert not r1v_accuracy(response(WRONG[row["question_type"]]), sample["answer"], drop_spaces=True)
            assert not grade_answer(sample["answer"], f"<answer>{sample['answer']}</answer>")  # why it must be bare
    assert set(load_folder(folder, "test").column_names) >= {"problem", "reasoning", "answer", "videos", "problem_type"}


def test_easyr1_loads_as_easyr1_reads_it_and_renders_the_training_prompt(exports, rows):
    video_dir = json.loads((exports / MANIFEST_FILE).read_text())["video_dir"]
    template = jinja2.Template((exports / EASYR1_FORMAT_PROMPT_FILE).read_text().strip())
    by_id = {r["qa_id"]: r for r in rows}
    for split, members in TRAINER_SPLITS.items():
        data = load_folder(exports / "easyr1", split)
        assert set(data["qa_id"]) == members
        for sample in data:
            row = by_id[sample["qa_id"]]
            # EasyR1: `videos` a list of paths joined with data.image_dir; the video goes where
            # "<video>" stands in the rendered prompt.
            assert [os.path.join(video_dir, v) for v in sample["videos"]] == [row["video_uri"]]
            assert template.render(content=sample["problem"]).split("<video>") == ["", row["prompt"]]
            assert sample["problem_type"] == ("multiple choice" if row["question_type"] == MULTIPLE_CHOICE else "free-form")
            assert r1v_accuracy(response(row["answer"]), sample["answer"], drop_spaces=False)
            assert not r1v_accuracy(response(WRONG[row["question_type"]]), sample["answer"], drop_spaces=False)


def test_an_empty_split_has_its_file_and_the_other_splits_still_load(tmp_path, rows):
    only_rl = [r for r in rows if r["split"] == "rl"]
    write_exports(LocalFileSystem(), str(tmp_path), only_rl)
    for fmt in ("longvideo-reason", "easyr1"):
        assert load_folder(tmp_path / fmt, "train").num_rows == 2
        assert (tmp_path / fmt / "test.parquet").is_file()
        with pytest.raises(ValueError, match="corresponds to no data"):
            load_folder(tmp_path / fmt, "test")
    assert datasets.load_dataset("parquet", data_files=str(tmp_path / "trl" / "*.parquet"), split="train").num_rows == 2
    assert json.loads((tmp_path / "llava" / "eval.json").read_text()) == []
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["video_dir"] == os.path.dirname(os.path.dirname(rows[2]["video_uri"]))


def parts(messages: list[dict]) -> list[dict]:
    return [part for m in messages for part in m["content"]]


def test_trl_export_trains_with_trls_sft_trainer(exports, rows, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

    from models.vlm import load_preprocess_config

    by_id = {r["qa_id"]: r for r in rows}
    data = datasets.load_dataset("parquet", data_files=str(exports / "trl" / "sft.parquet"), split="train")
    assert sorted(data["qa_id"]) == ["q0", "q1"]
    for sample in data:
        row = by_id[sample["qa_id"]]
        # Each content part holds its own keys only, never a null one.
        assert parts(sample["prompt"]) == [{"type": "video", "video": row["video_uri"]}, {"type": "text", "text": row["prompt"]}]
        assert parts(sample["completion"]) == [{"type": "text", "text": row["target"]}]
        assert sample["messages"] == sample["prompt"] + sample["completion"] and sample["videos"] == [row["video_uri"]]
        assert is_conversational(sample)
        assert prepare_multimodal_messages(sample["messages"], images=[]) == sample["messages"]  # TRL's VLM collator step

    path = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    preprocess = load_preprocess_config(str(path))

    def collate_videos(examples: list[dict]) -> dict[str, torch.Tensor]:
        """TRL's video recipe (a collator that reads the videos; `skip_prepare_dataset`), with TRL's
        chat-template rendering of the prompt/completion pair and the project's video preprocessing."""
        encoded = []
        for example in examples:
            text = apply_chat_template({"prompt": example["prompt"], "completion": example["completion"]}, tokenizer)
            assert text["prompt"].count(VIDEO_PAD) == 1 and text["completion"].startswith("<think>")
            [video] = [p["video"] for p in parts(example["prompt"]) if p["type"] == "video"]
            inputs = build_video_inputs(tokenizer, text["prompt"], [read_video_frames(video, FrameSampling(num_frames=4))], preprocess)
            completion = tokenizer(text["completion"], add_special_tokens=False, return_tensors="pt")["input_ids"]
            n_prompt = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
            inputs["labels"] = inputs["input_ids"].clone()
            inputs["labels"][:, :n_prompt] = IGNORE_INDEX
            encoded.append(inputs)
        return collate(encoded, tokenizer.pad_token_id)

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, data_collator=collate_videos)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_llava_export_follows_llavas_conversation_format(exports, rows):
    by_id = {r["qa_id"]: r for r in rows}
    for split in ("sft", "rl", "eval"):
        records = json.loads((exports / "llava" / f"{split}.json").read_text())
        assert {r["id"] for r in records} == {r["qa_id"] for r in rows if r["split"] == split}
        for record in records:
            row = by_id[record["id"]]
            assert record["video"] == row["video_uri"] and "image" not in record
            turns = record["conversations"]
            # LLaVA's preprocessing: turns alternate human, gpt, starting with human; the media
            # token appears once, in the first human turn, which it starts.
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) % 2 == 0
            assert sum(t["value"].count("<video>") for t in turns) == 1 and turns[0]["value"].startswith("<video>\n")
            assert turns[0]["value"].removeprefix("<video>\n") == row["prompt"] and turns[1]["value"] == row["target"]
            assert all(set(t) == {"from", "value"} and isinstance(t["value"], str) for t in turns)
