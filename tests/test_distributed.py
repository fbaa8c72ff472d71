"""Lightning's strategies as users launch them: DDP and FSDP2 on 2 CPU processes (gloo) agree with
1 process, untied and tied, dense and mixture-of-experts; weights stream into the shards; checkpoints
leave the reference out and resume; precisions; the strategy configs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from prefmodule import DPOModule, ORPOModule, PreferenceDataModule, SimPOModule
from prefmodule.training.checkpoints import newest_checkpoint
from prefmodule.cli import main
from prefmodule.paths import resolve
from prefmodule.models.attention import VARLEN_SDPA
from prefmodule.reference.modes import load_table
from prefmodule.models.sharding import decoder_layer_classes, decoder_layer_policy, is_sharded

from conftest import TINY_MODEL, one_launch_at_a_time, write_jsonl

CONFIGS = Path(__file__).parent.parent / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
         "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.batch_size=4"]
FSDP1_ON_CPU = "The strategy `fsdp` requires a GPU accelerator"  # Lightning 2.6; torch's FSDP1 needs one too


def launch(*args: str, torchrun: bool = False, samples: bool = False) -> None:
    """``python -m prefmodule`` on 2 processes, re-launched by Lightning or started by ``torchrun``; without
    generated samples unless ``samples``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    command = [sys.executable, *torchrun, "-m", "prefmodule"]
    tests = str(Path(__file__).parent)  # the launched processes import ShardingReport from here
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    with one_launch_at_a_time():
        done = subprocess.run([*command, *args, "--trainer.devices=2", *QUIET,
                               *([] if samples else ["--samples.num_prompts=0"])], env=env, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def logged_val(log_dir: Path) -> dict[str, float]:
    row = next(r for r in csv.DictReader(open(log_dir / "metrics.csv")) if r["val/loss"])
    return {k: float(v) for k, v in row.items() if k.startswith("val/") and v}


def validate_on_one_process(config: str, val: str, ckpt: Path, root: Path, *extra: str) -> dict[str, float]:
    cli = main(["validate", "--config", str(CONFIGS / config), f"--data.val={val}", f"--ckpt_path={ckpt}",
                f"--trainer.default_root_dir={root}", "--trainer.devices=1", *QUIET, *extra])
    return {k: v.item() for k, v in cli.trainer.callback_metrics.items()}


# name -> relative tolerance of a batch-level statistic: different batches on 1 and on 2 processes
BATCH_STATISTICS = {"val/loss": 1e-3, "val/aux_loss": 1e-2}


def assert_same_metrics(two: dict[str, float], one: dict[str, float],
                        logged=("val/rewards/accuracies", "val/rewards/margins", "val/loss", "val/logps/chosen")) -> None:
    """Per-pair and per-token metrics are sums over all pairs: equal however the pairs are split. The loss
    is each batch's own mean (as in TRL): with a token-mean NLL inside (ORPO) or a router load-balancing
    loss (a product of batch means) it depends on the batching."""
    assert set(logged) <= two.keys()
    assert two.keys() == one.keys()
    for name, value in two.items():
        assert value == pytest.approx(one[name], rel=BATCH_STATISTICS.get(name, 1e-5), abs=1e-6), name


@pytest.mark.parametrize("config, reference, torchrun", [
    pytest.param("dpo.yaml", "copy", False, marks=pytest.mark.slow),
    pytest.param("dpo.yaml", "precomputed", False, marks=pytest.mark.slow),
    ("orpo.yaml", None, True),  # CI: DDP here; a tied MoE under DDP and FSDP2 in the test below
])
def test_ddp_two_processes_train_checkpoint_and_agree_with_one(config, reference, torchrun, tmp_path, small_data):
    train, val = small_data  # 32 and 16 pairs: 4 train batches per rank, no padded val pairs
    two_ranks_cache, one_rank_cache = tmp_path / "two_ranks_cache", tmp_path / "one_rank_cache"
    settings = [f"--model.reference={reference}", f"--model.ref_cache_dir={two_ranks_cache}"] if reference else []
    launch("fit", "--config", str(CONFIGS / config), f"--trainer.default_root_dir={tmp_path / 'ddp'}",
           f"--data.train={train}", f"--data.val={val}", "--trainer.strategy=ddp", "--model.lr=1e-3",
           "--trainer.max_steps=3", "--trainer.val_check_interval=3", *settings, torchrun=torchrun)
    log_dir = tmp_path / "ddp" / "lightning_logs" / "version_0"
    ckpt = log_dir / "checkpoints" / "last.ckpt"  # besides the best
    checkpoint = torch.load(ckpt, weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint["optimizer_states"][0]["state"]
    assert not [k for k in checkpoint["state_dict"] if k.startswith("ref_model.")]
    assert (log_dir / "hf_model" / "model.safetensors").is_file()
    # The validation at step 3 ran on the checkpoint's weights, half the pairs on each rank.
    one = validate_on_one_process(config, val, ckpt, tmp_path / "one",
                                  *([f"--model.ref_cache_dir={one_rank_cache}"] if reference else []))
    assert_same_metrics(logged_val(log_dir), one)
    if reference == "precomputed":  # each rank scored its shard; the gathered table equals one process's
        (val_entry,) = one_rank_cache.iterdir()
        assert len(list(two_ranks_cache.iterdir())) == 2  # train and val
        gathered = load_table(two_ranks_cache, val_entry.name)
        torch.testing.assert_close(gathered, load_table(one_rank_cache, val_entry.name), rtol=0, atol=0)
        assert gathered.shape == (16, 2) and not gathered.isnan().any()


class ShardingReport(L.Callback):
    """Runs inside the launched processes: what each rank holds when the optimizer steps."""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        from torch.distributed.tensor import DTensor

        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        report = {
            name: {
                "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
                "local_fraction": sum(p.to_local().numel() for p in model.parameters())
                / sum(p.numel() for p in model.parameters()),
                "with_grad": sum(p.grad is not None for p in model.parameters()),
                "optimized": sum(id(p) in optimized for p in model.parameters()),
                "parameters": sum(1 for _ in model.parameters()),
            }
            for name, model in (("policy", module.policy), ("reference", module.ref_model))
        }
        Path(trainer.default_root_dir, f"sharding_rank{trainer.global_rank}.json").write_text(json.dumps(report))
        if trainer.global_step == 0:  # the weights each rank read from the files, gathered, before any update
            start = AutoModelForCausalLM.from_pretrained(resolve(module.model_name))
            errors = {name: [(p.full_tensor() - expected).abs().max().item() for p, expected in
                             zip(model.parameters(), start.parameters(), strict=True)]
                      for name, model in (("policy", module.policy), ("reference", module.ref_model))}
            Path(trainer.default_root_dir, f"start_rank{trainer.global_rank}.json").write_text(json.dumps(errors))


@pytest.mark.slow  # CI runs FSDP2's shard, resume and export on the tied MoE below
def test_fsdp2_two_processes_shard_resume_agree_with_one_and_export(tmp_path, small_data):
    train, val = small_data
    common = ["--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "strategies" / "fsdp2.yaml"),
              "--trainer.strategy.data_parallel_size=2", f"--data.train={train}", f"--data.val={val}",
              "--model.lr=1e-3", "--trainer.val_check_interval=2"]
    first, second = tmp_path / "first", tmp_path / "second"
    launch("fit", *common, f"--trainer.default_root_dir={first}", "--trainer.max_steps=2",
           "--trainer.callbacks+=test_distributed.ShardingReport")
    for rank in (0, 1):
        start = json.loads((first / f"start_rank{rank}.json").read_text())  # streamed from the safetensors file
        assert len(start["policy"]) == len(start["reference"]) == 21
        assert max(start["policy"]) == max(start["reference"]) == 0.0
        report = json.loads((first / f"sharding_rank{rank}.json").read_text())
        policy, reference = report["policy"], report["reference"]
        assert policy["sharded"] and reference["sharded"]
        assert 0.4 < policy["local_fraction"] < 0.6  # each rank holds about half of every model
        assert policy["with_grad"] == policy["optimized"] == policy["parameters"]
        assert reference["with_grad"] == reference["optimized"] == 0  # no gradient memory, not optimized
    sharded = first / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"  # a link to the newest folder
    shards = sorted(sharded.glob("*.distcp"))  # one file per rank (save_distributed_checkpoint: true)
    assert len(shards) == 2 and 0.8 < shards[0].stat().st_size / shards[1].stat().st_size < 1.25
    saved = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    assert [k for k in saved if "policy." in k] and not [k for k in saved if "ref_model." in k]

    # Resume from the shards; this run gathers one full checkpoint file on rank 0.
    launch("fit", *common, f"--trainer.default_root_dir={second}", "--trainer.max_steps=4", f"--ckpt_path={sharded}",
           "--trainer.strategy.save_distributed_checkpoint=false")
    log_dir = second / "lightning_logs" / "version_0"
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    assert checkpoint["global_step"] == 4 and checkpoint["lr_schedulers"][0]["last_epoch"] == 4
    assert [state["step"].item() for state in checkpoint["optimizer_states"][0]["state"].values()] == [4.0] * 21
    assert not [k for k in checkpoint["state_dict"] if k.startswith("ref_model.")]
    steps = [int(r["step"]) for r in csv.DictReader(open(log_dir / "metrics.csv")) if r["train/loss"]]
    assert steps == [2, 3]  # the resumed run trained steps 3 and 4 only

    exported = load_file(log_dir / "hf_model" / "model.safetensors")  # gathered from both ranks
    policy = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    assert exported.keys() == policy.keys()
    for name, value in policy.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
    assert_same_metrics(logged_val(log_dir), validate_on_one_process("dpo.yaml", val, ckpt, tmp_path / "one"))


@pytest.fixture
def tied_moe(tmp_path):
    """A Qwen2-MoE whose LM head is tied to its input embeddings and whose config asks for router logits (as
    fine-tuned MoE checkpoints often do), saved with the shipped tokenizer."""
    config = Qwen2MoeConfig(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, router_aux_loss_coef=0.02, tie_word_embeddings=True,
                            initializer_range=0.2, output_router_logits=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied_moe")
    AutoTokenizer.from_pretrained(resolve(TINY_MODEL)).save_pretrained(tmp_path / "tied_moe")
    return str(tmp_path / "tied_moe")


class TieReport(L.Callback):
    """Runs inside the launched processes: whether the policy's head is still its input embeddings."""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        from torch.distributed.tensor import DTensor

        head, embeddings = module.policy.get_output_embeddings(), module.policy.get_input_embeddings()
        report = {"tied": head.weight is embeddings.weight, "sharded": isinstance(embeddings.weight, DTensor),
                  "optimized_once": sum(p is embeddings.weight for g in optimizer.param_groups for p in g["params"])}
        Path(trainer.default_root_dir, f"tie_rank{trainer.global_rank}.json").write_text(json.dumps(report))


@pytest.mark.parametrize("strategy", [
    pytest.param(["--config", str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=2"],
                 id="fsdp2"),
    pytest.param(["--trainer.strategy=ddp"], id="ddp", marks=pytest.mark.slow),
])
def test_tied_moe_on_two_processes_stays_tied_resumes_exports_and_agrees_with_one(strategy, tied_moe, tmp_path,
                                                                                    small_data):
    train, val = small_data
    common = ["--config", str(CONFIGS / "dpo.yaml"), *strategy, f"--model.model={tied_moe}", f"--data.train={train}",
              f"--data.val={val}", "--model.lr=1e-3", "--trainer.val_check_interval=2",
              "--trainer.callbacks+=test_distributed.TieReport"]
    sharded = strategy[0] == "--config"
    first, second = tmp_path / "first", tmp_path / "second"
    launch("fit", *common, f"--trainer.default_root_dir={first}", "--trainer.max_steps=2",
           "--samples.num_prompts=2", "--samples.max_new_tokens=4", samples=True)  # sharded generation
    samples = [json.loads(line) for line in open(first / "lightning_logs" / "version_0" / "samples.jsonl")]
    assert [row["step"] for row in samples] == [0, 0, 2, 2]
    saved = newest_checkpoint(first)
    assert saved.name.endswith("step=2.ckpt")
    launch("fit", *common, f"--trainer.default_root_dir={second}", "--trainer.max_steps=4", f"--ckpt_path={saved}",
           *(["--trainer.strategy.save_distributed_checkpoint=false"] if sharded else []))
    for root in (first, second):  # before the first steps and after the resume
        for rank in (0, 1):
            report = json.loads((root / f"tie_rank{rank}.json").read_text())
            assert report == {"tied": True, "sharded": sharded, "optimized_once": 1}

    log_dir = second / "lightning_logs" / "version_0"
    ckpt = newest_checkpoint(second)
    assert ckpt.name.endswith("step=4.ckpt") and ckpt.parent == log_dir / "checkpoints"
    policy = {k.removeprefix("policy."): v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()
              if k.startswith("policy.")}
    assert "lm_head.weight" not in load_file(log_dir / "hf_model" / "model.safetensors")  # saved once, as tied
    reloaded = AutoModelForCausalLM.from_pretrained(log_dir / "hf_model")  # experts saved one by one, fused again
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.state_dict().keys() == policy.keys()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, policy[name], rtol=0, atol=0, msg=name)
    train_rows = [r for r in csv.DictReader(open(log_dir / "metrics.csv")) if r["train/loss"]]
    assert [int(r["step"]) for r in train_rows] == [2, 3] and all(float(r["train/aux_loss"]) > 1 for r in train_rows)
    one = validate_on_one_process("dpo.yaml", val, ckpt, tmp_path / "one", f"--model.model={tied_moe}")
    assert_same_metrics(logged_val(log_dir), one)


class GradientReport(L.Callback):
    """Runs inside the launched processes: the policy's gradients when the first optimizer step begins (after
    DDP's all-reduce), one file per rank."""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = {name: p.grad.clone() for name, p in module.policy.named_parameters() if p.grad is not None}
            torch.save(grads, Path(trainer.default_root_dir, f"grads_rank{trainer.global_rank}.pt"))


@pytest.mark.parametrize("chunk_size", [512, 0], ids=["chunked_head", "full_logits"])
def test_ddp_all_reduces_the_gradients_of_the_chunked_and_full_logits_heads(chunk_size, tmp_path, demo_rows):
    """One step on 4 pairs: 2 processes of 2 pairs each end with the gradients of 1 process on all 4 (DPO's loss
    is a mean over pairs, DDP averages over ranks). A head whose gradients skipped the all-reduce would leave each
    rank with its own 2 pairs' gradients."""
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows[:4])
    common = ["fit", "--config", str(CONFIGS / "dpo.yaml"), f"--data.train={train}", "--trainer.max_steps=1",
              "--trainer.limit_val_batches=0", f"--model.logps_chunk_size={chunk_size}", "--export.enabled=false",
              "--trainer.callbacks+=test_distributed.GradientReport", "--trainer.enable_checkpointing=false"]
    launch(*common, "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path / 'two'}")
    main([*common, f"--trainer.default_root_dir={tmp_path / 'one'}", "--trainer.devices=1", *QUIET,
          "--samples.num_prompts=0"])
    one = torch.load(tmp_path / "one" / "grads_rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"grads_rank{rank}.pt") for rank in (0, 1)]
    head = "lm_head.weight"
    assert one.keys() == ranks[0].keys() == ranks[1].keys() and head in one and one[head].norm() > 0
    for name, grad in one.items():
        for rank in ranks:
            torch.testing.assert_close(rank[name], grad, rtol=1e-4, atol=1e-7, msg=name)


class BatchRecorder(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, batch.index.tolist()))


class InterruptAfterEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, module) -> None:
        trainer.should_stop = True


def test_resume_from_epoch_end_equals_an_uninterrupted_run(tmp_path, demo_rows):
    """Optimizer, schedule, step and data order all resume: the same batches, the same weights. (The
    train order is seeded by seed + epoch; mid-epoch resume: ``test_modules.py``.)"""
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows[:16])

    def fit(root, ckpt_path=None, interrupt=False):
        L.seed_everything(0)
        recorder = BatchRecorder()
        trainer = L.Trainer(default_root_dir=root, max_epochs=2, logger=False, enable_progress_bar=False,
                            callbacks=[recorder, *([InterruptAfterEpoch()] if interrupt else [])],
                            enable_model_summary=False, limit_val_batches=0)
        module = ORPOModule(model=TINY_MODEL, lr=1e-3, warmup=1, lr_schedule="cosine")
        trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, batch_size=8)), ckpt_path=ckpt_path)
        return trainer, module, recorder.seen

    _, whole, whole_seen = fit(tmp_path / "whole")
    first, _, first_seen = fit(tmp_path / "parts", interrupt=True)
    resumed, module, resumed_seen = fit(tmp_path / "parts", str(newest_checkpoint(tmp_path / "parts")))
    assert [(e, i) for e, i, _ in first_seen + resumed_seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert first_seen + resumed_seen == whole_seen
    assert resumed.global_step == 4 and resumed.lr_scheduler_configs[0].scheduler.last_epoch == 4
    for (name, value), expected in zip(module.policy.named_parameters(), whole.policy.parameters()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("module_class, precision, weights_dtype", [
    (DPOModule, "bf16-true", torch.bfloat16),
    (ORPOModule, "bf16-mixed", torch.float32),
    (SimPOModule, "16-mixed", torch.float32),  # no fp16 autocast on CPU: Lightning takes bf16-mixed
])
def test_precision_flags_train_and_keep_logps_float32(module_class, precision, weights_dtype, tmp_path, small_data):
    train, val = small_data
    module = module_class(model=TINY_MODEL, lr=1e-3)
    data = PreferenceDataModule(train=train, val=val, batch_size=4)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, precision=precision, logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=2)
    trainer.fit(module, datamodule=module.connect(data))
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert next(module.policy.parameters()).dtype == weights_dtype
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        outputs = module.batch_outputs(batch)[0]
    assert outputs.chosen.logps.dtype == torch.float32 and torch.isfinite(outputs.chosen.logps).all()


@pytest.mark.parametrize("name, strategy", [("fsdp2", "ModelParallelStrategy"), ("fsdp", "FSDPStrategy")])
def test_strategy_configs_parse_on_top_of_any_objective(name, strategy, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "orpo.yaml"), "--config", str(CONFIGS / "strategies" / f"{name}.yaml"),
              "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["strategy"]["class_path"] == f"lightning.pytorch.strategies.{strategy}"
    assert config["model"]["class_path"] == "prefmodule.ORPOModule"
    settings = config["trainer"]["strategy"]["init_args"]
    if name == "fsdp":
        assert settings["auto_wrap_policy"] == settings["activation_checkpointing_policy"] == \
            "prefmodule.models.sharding.decoder_layer_policy"


def test_decoder_layers_come_from_the_model_itself():
    module = DPOModule(model=TINY_MODEL)
    module.configure_model()
    assert decoder_layer_classes(module.policy) == (LlamaDecoderLayer,)
    wrapped = [m for m in module.modules() if decoder_layer_policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == list(module.ref_model.model.layers) + list(module.policy.model.layers)
    assert decoder_layer_policy(module=module, recurse=True, nonwrapped_numel=0)
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_reference_loaded_from_its_source_is_frozen_and_attends_per_sequence():
    module = DPOModule(model=TINY_MODEL, ref_model=TINY_MODEL)
    module.configure_model()  # no FSDP2: loaded whole, for Lightning to place
    reference = module.ref_model
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert reference.config._attn_implementation == VARLEN_SDPA and not is_sharded(reference)


def test_fsdp1_refuses_cpu_with_the_documented_reason():
    with pytest.raises(ValueError, match=FSDP1_ON_CPU):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs CUDA: {FSDP1_ON_CPU}")
@pytest.mark.parametrize("config", ["dpo.yaml", "orpo.yaml"])
@pytest.mark.parametrize("strategy", [
    ["--trainer.strategy=ddp"],
    ["--config", str(CONFIGS / "strategies" / "fsdp.yaml")],
    ["--config", str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=1"],
], ids=["ddp", "fsdp", "fsdp2"])
def test_bf16_on_one_gpu(config, strategy, tmp_path, small_data):
    train, val = small_data
    cli = main(["fit", "--config", str(CONFIGS / config), *strategy, f"--trainer.default_root_dir={tmp_path}",
                f"--data.train={train}", f"--data.val={val}", "--trainer.accelerator=cuda", "--trainer.devices=1",
                "--trainer.precision=bf16-mixed", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                "--data.batch_size=4", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 4
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert (Path(cli.trainer.log_dir) / "hf_model" / "model.safetensors").is_file()
