"""``research.prediction_agreement`` on hand-made prediction folders whose Dice values, probability
differences and file sets are counted by hand below."""

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_mobilevim.research.prediction_agreement import (
    PROBABILITY_ROUNDING,
    check,
    compare_folders,
    dice_per_label,
    implied_logit_difference,
    main,
)

# (z, y, x) = (1, 2, 5); the voxel sets per label are written out in the tests
REFERENCE = np.array([[[0, 1, 1, 2, 2], [0, 0, 1, 2, 2]]], dtype=np.uint8)
CANDIDATE = np.array([[[0, 1, 2, 2, 2], [0, 0, 1, 2, 2]]], dtype=np.uint8)


def test_dice_per_label_counted_by_hand():
    # label 0: {(0,0),(1,0),(1,1)} in both -> 1
    # label 1: reference {(0,1),(0,2),(1,2)}, candidate {(0,1),(1,2)}: 2 * 2 / (3 + 2) = 0.8
    # label 2: reference {(0,3),(0,4),(1,3),(1,4)}, candidate those and (0,2): 2 * 4 / (4 + 5) = 8/9
    # label 3: only in the candidate, at (1,4) -> 0
    candidate = CANDIDATE.copy()
    candidate[0, 1, 4] = 3
    # label 2 then: candidate {(0,2),(0,3),(0,4),(1,3)}, shared {(0,3),(0,4),(1,3)}: 2 * 3 / (4 + 4) = 0.75
    assert dice_per_label(REFERENCE, candidate) == pytest.approx({0: 1.0, 1: 0.8, 2: 0.75, 3: 0.0})
    assert dice_per_label(REFERENCE, CANDIDATE) == pytest.approx({0: 1.0, 1: 0.8, 2: 8 / 9})
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_label(REFERENCE, REFERENCE[:, :1])


def test_implied_logit_difference_by_hand():
    p = np.array([0.5, 0.4, 1.0, 0.0, 0.0, 0.9, 0.3], dtype=np.float32)
    q = np.array([0.51, 0.6, 0.999, 1e-7, 1e-3, 0.9, 0.3 + 2e-7], dtype=np.float32)
    u = implied_logit_difference(p, q)
    d = np.abs(q.astype(np.float64) - p.astype(np.float64)) - PROBABILITY_ROUNDING
    expected = [d[0] / (2 * 0.25),  # at 1/2
                d[1] / (2 * 0.25),  # 0.4 -> 0.6 passes 1/2
                d[2] / (2 * float(q[2]) * (1 - float(q[2]))),  # saturated reference: the candidate's p(1-p)
                0.0,  # within the probabilities' own rounding
                d[4] / (2 * float(q[4]) * (1 - float(q[4]))),
                0.0, 0.0]
    assert u == pytest.approx(expected, rel=1e-9)
    assert u[2] == pytest.approx(0.5, rel=1e-3) and u[4] == pytest.approx(0.5, rel=2e-3)  # a saturated voxel moved
    assert implied_logit_difference(np.float32([1.0]), np.float32([0.5]))[0] == pytest.approx(1.0, rel=1e-5)
    assert np.isinf(implied_logit_difference(np.float64([1.0]), np.float64([1.5]))[0])  # no p(1-p) to explain it


def test_implied_logit_difference_bounds_a_softmax_perturbation():
    """Logits moved by at most u each: the implied difference of the softmax probabilities is at most u (to
    first order), and reaches ~u where the perturbation is the worst case (+u on one class, -u on the rest)."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, size=(3, 10000))
    softmax = lambda x: np.exp(x - x.max(0)) / np.exp(x - x.max(0)).sum(0)  # noqa: E731
    for u in (2.0 ** -10, 2.0 ** -6):
        p = softmax(z)
        assert implied_logit_difference(p, softmax(z + rng.uniform(-u, u, z.shape))).max() <= u * (1 + 4 * u)
        worst = -u * np.ones_like(z)
        worst[0] = u
        implied = implied_logit_difference(p, softmax(z + worst))[0]
        moderate = (p[0] > 0.05) & (p[0] < 0.95)
        assert implied[moderate].max() <= u * (1 + 4 * u) and implied[moderate].min() >= 0.9 * u


def _write_case(folder, name, seg, spacing=(0.8, 0.8, 2.5), probabilities=None, properties=None):
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(seg)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 5.0))
    sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))
    if probabilities is not None:
        np.savez_compressed(folder / f"{name}.npz", probabilities=probabilities)
    if properties is not None:
        with open(folder / f"{name}.pkl", "wb") as f:
            pickle.dump(properties, f)


def _folders(tmp_path):
    """Case a: the arrays above, probabilities differing in two of 30 values (by 0.25 and 0.125); case b
    the same in both, except the crop box in its .pkl."""
    ref, cand = tmp_path / "reference", tmp_path / "candidate"
    probabilities = np.zeros((3, 1, 2, 5), dtype=np.float32)
    changed = probabilities.copy()
    changed[1, 0, 0, 2], changed[2, 0, 1, 4] = 0.25, -0.125
    props = {"spacing": [2.5, 0.8, 0.8], "bbox_used_for_cropping": [[0, 1], [0, 2], [0, 5]]}
    _write_case(ref, "a", REFERENCE, probabilities=probabilities, properties=props)
    _write_case(cand, "a", CANDIDATE, probabilities=changed, properties={**props, "spacing": (2.5, 0.8, 0.8)})
    _write_case(ref, "b", REFERENCE, probabilities=probabilities, properties=props)
    _write_case(cand, "b", REFERENCE, probabilities=probabilities,
                properties={**props, "bbox_used_for_cropping": [[0, 1], [0, 2], [1, 5]]})
    return ref, cand


def test_folder_summary(tmp_path):
    ref, cand = _folders(tmp_path)
    summary = compare_folders(ref, cand)
    assert summary["cases"] == summary["compared"] == 2 and summary["same_files"]
    assert summary["geometry_equal"] and summary["dtype_equal"]
    assert summary["dice_agreement_min"] == pytest.approx(0.8)  # case a's label 1; case b agrees fully
    assert summary["files"]["b"]["dice"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    assert summary["max_abs_probability_difference"] == 0.25
    a = summary["files"]["a"]
    assert a["mean_abs_probability_difference"] == pytest.approx(0.375 / 30)
    assert a["probability_values_differing"] == pytest.approx(2 / 30)
    assert summary["files"]["b"]["max_abs_probability_difference"] == 0.0
    # a: 0 -> 0.25 is (0.25 - rounding) / (2 * 0.25 * 0.75) = 0.667; 0 -> -0.125 has no p(1-p) to explain it
    assert np.isinf(a["max_implied_logit_difference"]) and summary["files"]["b"]["max_implied_logit_difference"] == 0
    assert summary["max_implied_logit_difference"] == np.inf
    # a's properties differ only as tuple against list (equal); b's crop box differs
    assert a["properties_equal"] and not summary["files"]["b"]["properties_equal"]
    assert not summary["properties_equal"]
    assert check(summary, 0.8) is False  # the properties
    json.dumps(summary)  # plain JSON


def test_geometry_dtype_and_file_set_differences(tmp_path):
    ref, cand = _folders(tmp_path)
    _write_case(cand, "b", REFERENCE.astype(np.int16), spacing=(0.8, 2.5, 0.8))  # axis order swapped, int16
    (cand / "a.pkl").unlink()
    (cand / "c.nii.gz").write_bytes(b"")
    summary = compare_folders(ref, cand)
    assert summary["missing_in_candidate"] == ["a.pkl"] and summary["extra_in_candidate"] == ["c.nii.gz"]
    assert not summary["same_files"]
    b = summary["files"]["b"]
    assert not b["geometry_equal"] and b["reference_geometry"]["spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert not b["dtype_equal"] and not summary["geometry_equal"] and not summary["dtype_equal"]
    assert "properties_equal" not in summary["files"]["a"]  # no .pkl pair to compare


def test_command_line_thresholds_and_json(tmp_path, capsys):
    ref, cand = _folders(tmp_path)
    (cand / "b.pkl").write_bytes((ref / "b.pkl").read_bytes())  # properties equal
    out = tmp_path / "agreement.json"
    assert main([str(ref), str(cand), "-o", str(out), "--min-dice", "0.8", "--max-probability-difference", "0.25"]) == 0
    written = json.loads(out.read_text())
    assert written["ok"] and written["dice_agreement_min"] == pytest.approx(0.8)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_abs_probability_difference"] == 0.25
    assert main([str(ref), str(cand), "--min-dice", "0.81"]) == 1
    assert main([str(ref), str(cand), "--min-dice", "0.8", "--max-probability-difference", "0.2"]) == 1
    assert main([str(ref), str(cand)]) == 0  # no thresholds: a report only
    assert main([str(ref), str(cand), "--max-logit-difference", "1e6"]) == 1  # case a's inf
