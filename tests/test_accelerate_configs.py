"""The accelerate configs shipped in examples/accelerate parse with accelerate's own loader and launcher.

No test needs a free port: the launcher environment is prepared with --main_process_port 0 (accelerate picks a free
one), and each test runs while the configs' port 29500 is held, as on a machine where another job uses it."""

import os
import socket

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_multi_gpu_env

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "accelerate")


@pytest.fixture(autouse=True)
def port_29500_taken():
    """Hold 29500 (or find it held by someone else) for the test: accelerate's launcher refuses a taken main port
    on a multi-machine main rank."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 29500))
            s.listen()
        except OSError:
            pass  # already in use: the same situation
        yield


def parsed(name):
    """The launch arguments accelerate reads from config `name` (no port is opened or checked)."""
    args = launch_command_parser().parse_args(["--config_file", os.path.join(FOLDER, name), "train.py"])
    return _validate_launch_command(args)[0]


def launch_env(name):
    """The processes' environment accelerate's launcher prepares, on a free port of its choosing."""
    args = launch_command_parser().parse_args(["--config_file", os.path.join(FOLDER, name), "--main_process_port",
                                               "0", "train.py"])
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
    args = parsed("multinode.yaml")
    assert args.num_machines == 2 and args.machine_rank == 0
    assert args.main_process_ip == "10.0.0.1" and args.main_process_port == 29500
