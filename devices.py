"""Which device does a script run on, and does this machine have it?

`check_device` turns a device name that is wrong here into one line before anything loads;
`resolve_device` picks cuda when there is one for "auto".
"""
import torch

from config_utils import ConfigError


def check_device(device):
    """A device name torch knows and this machine has: one line otherwise (`gpu`, or `cuda` on a
    CPU build of torch), before anything loads."""
    if device in (None, "", "auto"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"config key 'device': {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device': {device} is not available here (torch {torch.__version__}, "
                              f"{'no GPU found' if torch.version.cuda else 'a build without CUDA'}); use --device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device': {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"config key 'device': {device!r} is not supported; use auto, cpu, cuda or cuda:N")


def resolve_device(device="auto"):
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
