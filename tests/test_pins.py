""".ci/check_pins.py: our pins against a torch wheel's requirements. .ci/run checks them against the
index; here, offline, against torch 2.13.0's manylinux wheel metadata as published on PyPI."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("check_pins", os.path.join(ROOT, ".ci", "check_pins.py"))
check_pins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_pins)

# requires_dist of torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (pip's --dry-run --report)
TORCH_2_13_LINUX = [
    "filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3", "networkx>=2.5.1", "jinja2",
    "fsspec>=0.8.5",
    'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3; '
    'platform_system == "Linux"',
    'cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"',
    'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
    'optree>=0.13.0; extra == "optree"',
]


def test_requirements_pins_resolve_with_torchs_linux_wheel():
    ours = check_pins.pins(open(os.path.join(ROOT, "requirements.txt")).read())
    assert ours["torch"] == "2.13.0"  # the metadata above is this version's: update both together
    assert check_pins.conflicts(ours, TORCH_2_13_LINUX, "3.11") == []


def test_a_triton_pin_the_wheel_does_not_accept_is_named():
    ours = check_pins.pins("torch==2.13.0\ntriton==3.9.0  # a comment\ntiktoken==0.14.0\nnumpy\n-r other.txt\n")
    assert ours == {"torch": "2.13.0", "triton": "3.9.0", "tiktoken": "0.14.0"}
    assert check_pins.conflicts(ours, TORCH_2_13_LINUX, "3.11") == [
        "triton==3.9.0: the Linux wheel requires triton==3.7.1"]
    # the marker decides: no triton requirement on a Python the wheel excludes, none from an extra
    assert check_pins.conflicts(ours, TORCH_2_13_LINUX, "3.15") == []
    assert check_pins.conflicts({"optree": "0.1"}, TORCH_2_13_LINUX, "3.11") == []
    assert check_pins.conflicts({"sympy": "1.12"}, TORCH_2_13_LINUX, "3.11") == [
        "sympy==1.12: the Linux wheel requires sympy>=1.13.3"]
