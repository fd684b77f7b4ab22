"""The tiny dataset the command-line tests share: planned and preprocessed once per session (2d and
3d_fullres), under a root that holds nnU-Net's three folders."""

import pytest
from nnunet_commands import DATASET, DATASET_ID, nnunet_env, run

from nnunetv2_mobilevim.research.synthetic import write_dataset


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    write_dataset(root / "raw" / DATASET, cases=6, test_cases=2, shape=(32, 40, 36), num_classes=2, channels=2)
    # planning with nnUNet_n_proc_DA=0 breaks 2.8.1's planner (torch.set_num_threads(0)), so use 1 here
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "3d_fullres", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], nnunet_env(root, nnUNet_n_proc_DA="1"))
    return root
