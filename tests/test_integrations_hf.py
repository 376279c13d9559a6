"""transformers' ``BameCallback`` (issue 16, section 2): the doc example as printed (exact resume, a plain
saved model, ``bame export`` of a checkpoint folder), gradient accumulation, and its refusals. Models are
tiny BERTs built from a config: nothing is downloaded."""

import os
import re

import pytest
import torch
from helpers import ROOT

from bame.cli import main
from bame.errors import CheckpointError
from bame.export import load_compressed
from bame.nm import is_nm

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reached for the hub would fail instead of downloading
transformers = pytest.importorskip("transformers", reason="transformers comes with bame[hf]")
from bame.integrations.huggingface import STATE_FILE, BameCallback  # noqa: E402  (needs transformers)

DOC = ROOT / "docs" / "huggingface.md"
CONFIG = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16, num_labels=2)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, size=32):
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(0, 32, (size, 8), generator=g), torch.randint(0, 2, (size,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainer_for(out, callback, add_later=False, eval_dataset=None, **args):
    torch.manual_seed(0)
    arguments = transformers.TrainingArguments(str(out), **{
        "max_steps": 4, "per_device_train_batch_size": 8, "save_steps": 2, "report_to": "none", "use_cpu": True,
        "disable_tqdm": True, **args})
    model = transformers.BertForSequenceClassification(CONFIG)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Tokens(), eval_dataset=eval_dataset,
                                   callbacks=None if add_later else [callback])
    if add_later:
        trainer.add_callback(callback)
    return trainer


def test_doc_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "doc"}
    exec(compile(code, str(DOC), "exec"), scope)
    assert "resumed run identical: True" in capsys.readouterr().out
    model, config = scope["model"].eval(), scope["config"]
    assert (tmp_path / "bert_run" / "checkpoint-4" / STATE_FILE).is_file()
    ids = torch.randint(0, 100, (3, 16))
    # The squashed model saved by the trainer is a plain BERT with 2:4 weights ...
    saved = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert_2of4").eval()
    query = saved.bert.encoder.layer[0].attention.self.query.weight
    assert is_nm(query != 0, 2, 4, exact=False)
    assert torch.equal(saved(input_ids=ids).logits, model(input_ids=ids).logits)
    # ... and the page's shell line exports the last checkpoint folder (raw weights and bame_sparsifier.pt).
    assert main(["export", "bert_run/checkpoint-8", "--format", "compressed"]) == 0
    fresh = transformers.BertForSequenceClassification(config)
    rebuilt = load_compressed("bert_run/checkpoint-8/model.compressed.safetensors", model=fresh)
    assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


def test_sparsifier_steps_with_the_optimizer_under_accumulation(tmp_path):
    callback = BameCallback(nm="2:4", delta_t=2)
    trainer = trainer_for(tmp_path, callback, gradient_accumulation_steps=2, save_strategy="no")
    trainer.train()
    # 32 samples, batches of 8, two batches per step: 2 optimizer steps per epoch, 4 in all.
    assert trainer.state.global_step == callback.sparsifier.state_dict()["step"] == 4
    assert all(is_nm(mask, 2, 4) for mask in callback.sparsifier.masks().values())


def test_resume_refusals_in_one_line(tmp_path):
    trainer_for(tmp_path, BameCallback(nm="2:4")).train()
    checkpoint = tmp_path / "checkpoint-2"
    late = trainer_for(tmp_path, BameCallback(nm="2:4"), add_later=True)  # never saw the model before the load
    with pytest.raises(CheckpointError, match="pass BameCallback to the Trainer when you build it"):
        late.train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint-2/{STATE_FILE} is missing"):
        trainer_for(tmp_path, BameCallback(nm="2:4")).train(resume_from_checkpoint=str(checkpoint))


def test_best_model_at_end_gets_its_own_masks(tmp_path):
    callback = BameCallback(method="sr_ste", nm="2:4")  # masks re-chosen at every step
    # At this learning rate the eval loss rises after step 2: the best checkpoint is not the last one, whose
    # masks the sparsifier holds when training ends.
    trainer = trainer_for(tmp_path, callback, eval_dataset=Tokens(8), eval_strategy="steps", eval_steps=2,
                          load_best_model_at_end=True, metric_for_best_model="loss", learning_rate=1e-2)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best, last = (torch.load(tmp_path / f"checkpoint-{n}" / STATE_FILE, weights_only=True)["sparsifier"]["layers"]
                  for n in (2, 4))
    assert any(not torch.equal(best[k]["mask"], last[k]["mask"]) for k in best)
    assert all(torch.equal(mask, best[k]["mask"]) for k, mask in callback.sparsifier.masks().items())
