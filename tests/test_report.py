"""Pictures and the cohort report: orientation, outlier flags, page structure."""

from __future__ import annotations

import html.parser
import math

import numpy as np
import pytest
import SimpleITK as sitk

from istn import report
from istn.report import PairReport, cohort_flags, cohort_html, to_lps, views

# ------------------------------------------------------------------------ orientation


def _marked_volume() -> np.ndarray:
    """[z, y, x] volume, LPS-aligned, with one voxel lit at the +L, +P and +S ends."""
    v = np.zeros((5, 6, 7))
    v[2, 3, 6] = 1  # +x: Left
    v[2, 5, 3] = 2  # +y: Posterior
    v[4, 3, 3] = 3  # +z: Superior
    return v


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, 1), (1, -1, -1)])
@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_to_lps_undoes_any_axis_permutation_and_flip(perm, flip):
    """Store the same physical volume with permuted/flipped axes (direction says how, as
    SimpleITK would after PermuteAxes/Flip); to_lps gives back the LPS-aligned array."""
    ref = sitk.GetImageFromArray(_marked_volume())
    ref.SetSpacing((1.0, 2.0, 3.0))
    img = sitk.PermuteAxes(ref, perm)
    img = sitk.Flip(img, [f < 0 for f in flip], flipAboutOrigin=False)
    got, sp = to_lps(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetDirection())
    assert np.array_equal(got, _marked_volume())
    assert np.allclose(sp, (1.0, 2.0, 3.0))


def test_planes_are_radiological_and_scaled_by_spacing():
    [(ax_p, axial), (co_p, coronal), (sa_p, sagittal)] = views(
        _marked_volume(), (1.0, 2.0, 3.0), None, centre=(2, 3, 3))
    assert (ax_p.name, co_p.name, sa_p.name) == ("axial", "coronal", "sagittal")
    # axial: anterior at the top (posterior marker at the bottom), left of patient on the
    # right of the screen (radiological)
    assert ax_p.markers == ("A", "P", "R", "L")
    assert axial[3, 6] == 1 and axial[5, 3] == 2
    # coronal: superior at the top, patient's left on the right of the screen
    assert co_p.markers == ("S", "I", "R", "L")
    assert coronal[0, 3] == 3 and coronal[2, 6] == 1
    # sagittal: superior at the top, anterior on the left
    assert sa_p.markers == ("S", "I", "A", "P")
    assert sagittal[0, 3] == 3 and sagittal[2, 5] == 2
    # pixel aspect (height / width) from the spacing of each plane
    assert ax_p.aspect == pytest.approx(2.0 / 1.0)
    assert co_p.aspect == pytest.approx(3.0 / 1.0)
    assert sa_p.aspect == pytest.approx(3.0 / 2.0)
    [(plane, img)] = views(np.zeros((4, 6)), (0.5, 2.0))
    assert plane.name == "" and plane.markers is None and plane.aspect == pytest.approx(4.0)


def test_pictures_with_labels_spacing_and_metrics(tmp_path):
    shape = (12, 16, 20)
    t = np.zeros(shape, dtype=np.int32)
    t[3:9, 4:12, 5:15] = 1
    t[5:7, 6:9, 12:15] = 3
    s = np.roll(t, 2, axis=2)
    img = np.random.default_rng(0).random(shape)
    path = tmp_path / "r.png"
    report.registration_figure(img, img, img, t, s, t, path, spacing=(1.0, 1.0, 2.5),
                               direction=(1, 0, 0, 0, -1, 0, 0, 0, 1), tre=(3.0, 1.0),
                               stage="refined")
    assert path.stat().st_size > 10_000
    # two labels: the legend names both; 2D without segmentations still works
    report.registration_figure(img[0], img[0], img[0], None, None, None, tmp_path / "n.png")
    report.loss_curve([{"epoch": 1, "train_loss": -0.5}, {"epoch": 2, "train_loss": -0.7,
                                                          "val_loss": -0.6}], tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 5_000


# ------------------------------------------------------------------- cohort report


def _pair(name, dice_pred, dice_ref, tre_pred=None, tre_ref=None, folding=None):
    v = {("dice", "", "predicted"): dice_pred, ("dice", "", "refined"): dice_ref}
    if tre_pred is not None:
        v[("tre", "", "predicted")] = tre_pred
        v[("tre", "", "refined")] = tre_ref
    if folding is not None:
        v[("folding", "", "refined")] = folding
    return PairReport(name, v)


def test_flags_worse_folding_and_low_dice():
    pairs = [_pair("a", 0.90, 0.92), _pair("b", 0.90, 0.85),  # b: refinement lowered Dice
             _pair("c", 0.91, 0.915, 2.0, 2.5),  # c: refinement raised TRE
             _pair("d", 0.90, 0.93, folding=0.2),  # d: folding
             _pair("e", 0.50, 0.40),  # e: worse, and far below the others
             _pair("f", 0.91, 0.9105, 2.0, 2.01)]  # f: changes within the tolerances
    flags = {p.name: [f.text for f in fl] for p, fl in zip(pairs, cohort_flags(pairs),
                                                          strict=True)}
    assert flags["a"] == [] and flags["f"] == []
    assert flags["b"] == ["refinement made Dice worse (0.900 → 0.850)"]
    assert flags["c"] == ["refinement made TRE worse (2.000 → 2.500)"]
    assert flags["d"] == ["folding: 0.200 % of voxels with Jacobian ≤ 0"]
    # Tukey's lower fence of the refined Dice: Q1 - 1.5 IQR over the six pairs
    q1, q3 = np.percentile([0.92, 0.85, 0.915, 0.93, 0.40, 0.9105], [25, 75])
    assert flags["e"][0].startswith("refinement made Dice worse")
    assert flags["e"][1] == f"low Dice: 0.400 < Q1 − 1.5·IQR = {q1 - 1.5 * (q3 - q1):.3f}"
    # fewer than 4 pairs: no spread to compare with
    assert all(not any(f.text.startswith("low") for f in fl)
               for fl in cohort_flags(pairs[3:]))


class _Table(html.parser.HTMLParser):
    """Header texts and, per body row, the ``data-v`` of every cell."""

    def __init__(self):
        super().__init__()
        self.heads, self.rows, self.where, self.imgs = [], [], None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("thead", "tbody", "tfoot"):
            self.where = tag
        elif tag == "th" and self.where == "thead":
            self.heads.append("")
        elif tag == "tr" and self.where == "tbody":
            self.rows.append([])
        elif tag == "td" and self.where == "tbody":
            self.rows[-1].append(a.get("data-v"))
        elif tag == "img" and self.where == "tbody":
            self.imgs.append(a)

    def handle_data(self, data):
        if self.where == "thead" and self.heads:
            self.heads[-1] += data


def test_cohort_html_one_row_per_pair_with_every_column(tmp_path):
    pairs = [PairReport("p1", {("dice", "1", "registered"): 0.8, ("dice", "3", "registered"):
                               0.6, ("hd95", "1", "registered"): 2.5,
                               ("tre", "", "unregistered"): 4.0,
                               ("tre", "", "registered"): 1.0,
                               ("folding", "", "registered"): 0.0},
                        thumbnail="0000_p1/report.png", picture="0000_p1/report.png"),
             PairReport("p<2>", {("dice", "1", "registered"): float("nan"),
                                 ("tre", "", "registered"): None},
                        thumbnail=report.data_uri(b"\x89PNG"))]
    page = tmp_path / "report.html"
    cohort_html(pairs, page, title="t & t")
    text = page.read_text(encoding="utf-8")
    assert "<title>t &amp; t</title>" in text and "p&lt;2&gt;" in text
    assert "http" not in text  # nothing fetched from elsewhere
    t = _Table()
    t.feed(text)
    t.heads = [h.strip() for h in t.heads]
    assert t.heads[:3] == ["pair", "flags", "overlay"]
    assert t.heads[3:] == ["Dice 1registered", "Dice 3registered", "HD95 1registered",
                           "TREunregistered", "TREregistered", "folding %registered"]
    assert len(t.rows) == 2
    assert t.rows[0][0] == "p1" and float(t.rows[0][3]) == 0.8 and float(t.rows[0][6]) == 4.0
    assert t.rows[1][3] == "" and t.rows[1][7] == ""  # undefined: empty, sorted last
    assert t.imgs[0]["src"] == "0000_p1/report.png"
    assert t.imgs[1]["src"].startswith("data:image/png;base64,")
    assert math.isclose(float(t.rows[0][8]), 0.0)
