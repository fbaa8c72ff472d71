"""Every library private name prefmodule uses (``prefmodule/private/``), and every private hook its subclasses
override, still there with the shape prefmodule relies on, on the installed versions."""

import inspect
import tempfile

import datasets
import lightning
import pytest
import torch
import transformers
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.states import RunningStage
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from prefmodule.paths import resolve
from prefmodule.private import datasets as private_datasets
from prefmodule.private import lightning as private_lightning
from prefmodule.private import torch as private_torch
from prefmodule.private import transformers as private_transformers
from prefmodule.training.checkpoints import AtomicCheckpoint, BestCheckpoint, RunCheckpoint
from prefmodule.training.cli import PrefCLI

VERSIONS = {"lightning": lightning.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "datasets": datasets.__version__}


def moved(library: str, name: str, where: str) -> str:
    """The failure message: which library name went, and which prefmodule code needs a new way."""
    place = where if "/" in where else f"prefmodule/private/{library}.py: {where}"
    return f"{library} {VERSIONS[library]} moved {name}: {place} needs a new way"


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def assert_method(owner: type, name: str, expected: list[str], message: str) -> None:
    method = getattr(owner, name, None)
    assert callable(method), message
    assert parameters(method) == expected, f"{message} (its parameters are now {parameters(method)})"


def assert_override(subclass: type, owner: type, name: str, where: str, caller=None, call: str = "self") -> None:
    """``subclass`` overrides ``owner``'s private ``name``, which ``owner`` still has and ``caller`` (``owner``)
    still calls (on ``call``)."""
    message = moved("lightning", f"{owner.__name__}.{name}", where)
    assert name in vars(subclass), f"{subclass.__name__} no longer overrides {name}"
    assert_method(owner, name, parameters(vars(subclass)[name]), message)
    assert f"{call}.{name}(" in inspect.getsource(caller or owner), message


@pytest.fixture
def trainer():
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)


@pytest.fixture(scope="module")
def tiny_llama():
    config = AutoConfig.from_pretrained(resolve("asset://tiny-llama"))
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


# ----- Lightning -------------------------------------------------------------------------------------------------
def test_attached_trainer_is_none_until_the_module_is_attached(trainer):
    module = LightningModule()
    assert private_lightning.attached_trainer(module) is None, moved(
        "lightning", "LightningModule.trainer (no longer raises RuntimeError when detached)", "attached_trainer")
    module.trainer = trainer
    assert private_lightning.attached_trainer(module) is trainer


def test_cli_prepare_subcommand_parser():
    assert_method(LightningCLI, "_prepare_subcommand_parser", ["self", "klass", "subcommand", "kwargs"],
                  moved("lightning", "LightningCLI._prepare_subcommand_parser", "prepare_subcommand_parser"))
    assert_override(PrefCLI, LightningCLI, "_prepare_subcommand_parser", "prefmodule/training/cli.py: PrefCLI")


def test_cli_parse_ckpt_path():
    assert_method(LightningCLI, "_parse_ckpt_path", ["self"],
                  moved("lightning", "LightningCLI._parse_ckpt_path", "parse_ckpt_path"))
    assert_override(PrefCLI, LightningCLI, "_parse_ckpt_path", "prefmodule/training/cli.py: PrefCLI")


def test_cli_instantiate_trainer():
    assert_method(LightningCLI, "_instantiate_trainer", ["self", "config", "callbacks"],
                  moved("lightning", "LightningCLI._instantiate_trainer", "instantiate_trainer"))
    assert_override(PrefCLI, LightningCLI, "_instantiate_trainer", "prefmodule/training/cli.py: PrefCLI")


def test_checkpoint_save_topk_checkpoint():
    assert_method(ModelCheckpoint, "_save_topk_checkpoint", ["self", "trainer", "monitor_candidates"],
                  moved("lightning", "ModelCheckpoint._save_topk_checkpoint", "save_topk_checkpoint"))
    assert_override(BestCheckpoint, ModelCheckpoint, "_save_topk_checkpoint",
                    "prefmodule/training/checkpoints.py: BestCheckpoint")


@pytest.mark.parametrize("name, expected", [
    ("_should_skip_saving_checkpoint", ["self", "trainer"]),
    ("_monitor_candidates", ["self", "trainer"]),
    ("_save_topk_checkpoint", ["self", "trainer", "monitor_candidates"]),
    ("_save_last_checkpoint", ["self", "trainer", "monitor_candidates"]),
])
def test_checkpoint_save_sequence(name, expected):
    assert_method(ModelCheckpoint, name, expected, moved("lightning", f"ModelCheckpoint.{name}", "save_now"))


def test_checkpoint_saved_state_is_kept_and_read():
    message = moved("lightning", "ModelCheckpoint._last_global_step_saved/_last_checkpoint_saved", "record_saved")
    callback = ModelCheckpoint()
    assert (callback._last_global_step_saved, callback._last_checkpoint_saved) == (0, ""), message
    source = inspect.getsource(ModelCheckpoint)
    assert "self._last_global_step_saved ==" in source and "self._last_checkpoint_saved" in source, message

    class Saved:
        global_step = 7

    private_lightning.record_saved(callback, Saved(), "/run/epoch=0-step=7.ckpt")
    assert (callback._last_global_step_saved, callback._last_checkpoint_saved) == (7, "/run/epoch=0-step=7.ckpt")


def test_checkpoint_save_checkpoint_override():
    assert_override(AtomicCheckpoint, ModelCheckpoint, "_save_checkpoint",
                    "prefmodule/training/checkpoints.py: AtomicCheckpoint")


def test_checkpoint_find_last_checkpoints_override():
    from lightning.pytorch.trainer.connectors import checkpoint_connector

    assert_override(RunCheckpoint, ModelCheckpoint, "_find_last_checkpoints",
                    "prefmodule/training/checkpoints.py: RunCheckpoint", checkpoint_connector, "callback")


def test_throughput_monitor_keeps_a_throughput_per_stage(trainer):
    message = moved("lightning", "ThroughputMonitor._throughputs", "stage_throughput")
    monitor = ThroughputMonitor(batch_size_fn=len, window_size=2)
    trainer.state.stage = RunningStage.TRAINING
    monitor.setup(trainer, LightningModule(), "fit")
    throughput = private_lightning.stage_throughput(monitor, RunningStage.TRAINING)
    assert isinstance(throughput, Throughput), message
    throughput.update(time=0.0, batches=1, samples=2, lengths=10)
    throughput.update(time=2.0, batches=2, samples=4, lengths=30)
    assert throughput.compute()["device/items_per_sec"] == 10.0


def test_fit_loop_pending_loader_states(trainer):
    message = moved("lightning", "_FitLoop's loader state", "apply_pending_loader_states")
    loop = trainer.fit_loop
    assert (loop._combined_loader_states_to_load, loop._combined_loader, loop._data_fetcher) == ([], None, None), \
        message
    assert_method(type(loop), "_load_combined_loader_states", ["self"], message)
    loop._combined_loader_states_to_load = [{"epoch": 1, "batches": 3}]
    private_lightning.apply_pending_loader_states(trainer)  # nothing to apply it to yet: left pending
    assert loop._combined_loader_states_to_load == [{"epoch": 1, "batches": 3}]


# ----- transformers ----------------------------------------------------------------------------------------------
def test_config_attn_implementation(tiny_llama):
    assert private_transformers.attn_implementation(tiny_llama.config) == "sdpa", moved(
        "transformers", "PreTrainedConfig._attn_implementation", "attn_implementation")


def test_no_split_modules(tiny_llama):
    message = moved("transformers", "PreTrainedModel._no_split_modules", "no_split_modules")
    assert private_transformers.no_split_modules(tiny_llama) == ("LlamaDecoderLayer",), message
    assert "LlamaDecoderLayer" in private_transformers.no_split_modules(type(tiny_llama.model)), message


def test_from_config(tiny_llama):
    message = moved("transformers", "PreTrainedModel._from_config", "from_config")
    assert_method(type(tiny_llama), "_from_config", ["config", "kwargs"], message)
    with torch.device("meta"):
        copy = private_transformers.from_config(type(tiny_llama), tiny_llama.config)
    assert type(copy) is type(tiny_llama) and copy.lm_head.weight.is_meta, message


def test_init_module_weights(tiny_llama):
    rotary = tiny_llama.model.rotary_emb
    expected = rotary.inv_freq.clone()
    rotary.inv_freq.zero_()
    private_transformers.init_module_weights(tiny_llama, rotary)
    assert torch.equal(rotary.inv_freq, expected), moved(
        "transformers", "PreTrainedModel._init_weights (no longer recomputes rotary frequencies)", "init_module_weights")


def test_register_recordable_outputs(tiny_llama):
    message = moved("transformers", "output_capturing._CAN_RECORD_REGISTRY", "register_recordable_outputs")
    decoder = AutoModelForCausalLM.from_config(tiny_llama.config).model
    decoder.__class__ = type("FSDPLlamaModel", (type(decoder),), {})  # renamed as FSDP2 renames it
    assert _CAN_RECORD_REGISTRY.get(decoder) == {}, message
    private_transformers.register_recordable_outputs(decoder)
    recorded = _CAN_RECORD_REGISTRY.get(decoder)
    assert recorded and recorded == type(tiny_llama.model)._can_record_outputs, message
    assert "hidden_states" in recorded, message


# ----- torch -----------------------------------------------------------------------------------------------------
def test_non_persistent_buffers():
    module = nn.Module()
    module.register_buffer("kept", torch.zeros(1))
    module.register_buffer("computed", torch.zeros(1), persistent=False)
    assert private_torch.non_persistent_buffers(module) == {"computed"}, moved(
        "torch", "nn.Module._non_persistent_buffers_set", "non_persistent_buffers")


def test_has_forward_hooks():
    message = moved("torch", "nn.Module._forward_pre_hooks/_forward_hooks", "has_forward_hooks")
    linear = nn.Linear(2, 2)
    assert not private_torch.has_forward_hooks(linear), message
    handle = linear.register_forward_pre_hook(lambda module, args: None)
    assert private_torch.has_forward_hooks(linear), message
    handle.remove()
    assert not private_torch.has_forward_hooks(linear), message
    linear.register_forward_hook(lambda module, args, output: None)
    assert private_torch.has_forward_hooks(linear), message


def test_awaits_forward():
    """The FSDP2 unit of tied embeddings and head, its head run on its own after the decoder, as
    :func:`prefmodule.models.sharding.finish_forward` finds it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    message = moved("torch", "FSDPState._modules_to_run_forward", "awaits_forward")
    assert not dist.is_initialized(), "a process group left by another test"
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            decoder, head = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4)), nn.Linear(4, 8)
            embeddings = decoder[0]
            fully_shard([embeddings, head], mesh=mesh)
            fully_shard(decoder, mesh=mesh)
            head(decoder(torch.zeros(1, dtype=torch.long)))
            assert private_torch.awaits_forward(embeddings), message
            embeddings(torch.zeros(0, dtype=torch.long))
            assert not private_torch.awaits_forward(embeddings), message
        finally:
            dist.destroy_process_group()


# ----- datasets --------------------------------------------------------------------------------------------------
def test_dataset_fingerprint():
    message = moved("datasets", "Dataset._fingerprint", "dataset_fingerprint")
    dataset = datasets.Dataset.from_dict({"prompt": ["a", "b"]})
    fingerprint = private_datasets.dataset_fingerprint(dataset)
    assert isinstance(fingerprint, str) and fingerprint, message
    assert private_datasets.dataset_fingerprint(dataset.select([0])) != fingerprint, message
