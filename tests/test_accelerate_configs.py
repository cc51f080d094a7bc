"""The accelerate configs shipped in examples/accelerate parse with accelerate's own loader and launcher."""

import os

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_multi_gpu_env

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "accelerate")


def launch_env(name):
    args = launch_command_parser().parse_args(["--config_file", os.path.join(FOLDER, name), "train.py"])
    args = _validate_launch_command(args)[0]
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, kind, processes", [("ddp.yaml", DistributedType.MULTI_GPU, 2),
                                                   ("fsdp2.yaml", DistributedType.FSDP, 2),
                                                   ("multinode.yaml", DistributedType.MULTI_GPU, 16)])
def test_config_parses(name, kind, processes):
    config = load_config_from_file(os.path.join(FOLDER, name))
    assert config.distributed_type == kind and config.num_processes == processes
    args, env = launch_env(name)
    assert args.num_processes == processes and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp2_config_reaches_the_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, env = launch_env("fsdp2.yaml")
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what Accelerator builds from the launcher's environment
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def test_multinode_config_names_the_main_machine():
    args, _ = launch_env("multinode.yaml")
    assert args.num_machines == 2 and args.machine_rank == 0
    assert args.main_process_ip == "10.0.0.1" and args.main_process_port == 29500
