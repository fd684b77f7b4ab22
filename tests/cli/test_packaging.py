"""The wheel a user installs carries the configs, the ext-trainer shim and the demo data."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_package_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("nnunetv2_mobilevim-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ["nnunetv2_mobilevim/network_configs/mobilevim_s.json",
                     "nnunetv2_mobilevim/network_configs/mobilevim_xs.json",
                     "nnunetv2_mobilevim/ext_trainers/nnunetv2_mobilevim_trainers.py",
                     "nnunetv2_mobilevim/demo_data/PROVENANCE.md",
                     "nnunetv2_mobilevim/demo_data/imagesTs/itkperson_0000.nii.gz",
                     "nnunetv2_mobilevim/demo_data/labelsTs/itkperson.nii.gz",
                     "nnunetv2_mobilevim/ssm/torch_scan.py",
                     "nnunetv2_mobilevim/networks/mobilevim/network.py", "nnunetv2_mobilevim/acceleration/training.py",
                     "nnunetv2_mobilevim/cli/main.py", "nnunetv2_mobilevim/research/compare.py"]:
        assert required in names, required
    assert not any(n.startswith("nnunetv2_mobilevim/ext_trainers/__init__") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nnunetv2_mobilevim = nnunetv2_mobilevim.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
