"""Readers of the refer-API files and of TransVG/CLIP-VG ``.pth`` lists, on hand-written real-format fixtures."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from groundkit.formats import refcoco, transvg


def _write_refer_fixture(root):
    """Two refs in one image, copied in shape from the released RefCOCO files (values invented)."""
    refs = [
        {
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000581857_1719310.jpg",
            "ann_id": 1719310,
            "ref_id": 0,
            "image_id": 581857,
            "split": "testA",
            "sentences": [
                {
                    "tokens": ["the", "lady", "with", "the", "blue", "shirt"],
                    "raw": "THE LADY WITH THE BLUE SHIRT",
                    "sent_id": 0,
                    "sent": "the lady with the blue shirt",
                },
                {"tokens": ["lady", "left"], "raw": "lady left", "sent_id": 1, "sent": "lady left"},
            ],
            "category_id": 1,
        },
        {
            "sent_ids": [2],
            "file_name": "COCO_train2014_000000581857_1720000.jpg",
            "ann_id": 1720000,
            "ref_id": 1,
            "image_id": 581857,
            "split": "testB",
            "sentences": [{"tokens": ["cup"], "raw": "cup", "sent_id": 2, "sent": "cup"}],
            "category_id": 47,
        },
    ]
    inst = {
        "images": [
            {
                "id": 581857,
                "file_name": "COCO_train2014_000000581857.jpg",
                "height": 640,
                "width": 427,
                "license": 1,
                "coco_url": "",
                "flickr_url": "",
                "date_captured": "",
            }
        ],
        "annotations": [
            {
                "id": 1719310,
                "image_id": 581857,
                "category_id": 1,
                "bbox": [103.93, 299.99, 134.22, 177.42],
                "area": 23813.0,
                "iscrowd": 0,
                "segmentation": [[103.93, 299.99, 238.15, 299.99, 238.15, 477.41]],
            },
            {
                "id": 1720000,
                "image_id": 581857,
                "category_id": 47,
                "bbox": [10.0, 20.0, 30.0, 40.0],
                "area": 1200.0,
                "iscrowd": 0,
                "segmentation": [],
            },
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 47, "name": "cup", "supercategory": "kitchen"},
        ],
    }
    (root / "refcoco").mkdir(parents=True)
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (root / "refcoco" / "instances.json").write_text(json.dumps(inst))
    return refs, inst


def test_refer_fixture_join(tmp_path):
    _write_refer_fixture(tmp_path)
    data = refcoco.load_refer(tmp_path)
    assert data.splits() == ["testA", "testB"]
    samples = data.samples()
    assert len(samples) == 3
    s = data.samples("testA")[0]
    assert s.sentence == "the lady with the blue shirt" and s.category == "person"
    assert s.file_name == "COCO_train2014_000000581857.jpg"
    assert s.image_path == tmp_path / refcoco.IMAGE_SUBDIR / "COCO_train2014_000000581857.jpg"
    assert s.box_xywh == pytest.approx((103.93, 299.99, 134.22, 177.42))
    assert s.box_xyxy == pytest.approx((103.93, 299.99, 238.15, 477.41))
    assert [x.ref_id for x in data.samples("testB")] == [1]
    with pytest.raises(ValueError, match="split 'train' not in the refs"):
        data.samples("train")


def test_refer_rejects_bad_files(tmp_path):
    refs, inst = _write_refer_fixture(tmp_path)
    # a ref pointing to a missing annotation
    refs[1]["ann_id"] = 5
    refcoco.save_refs_pickle(refs, tmp_path / "refcoco" / "refs(unc).p")
    with pytest.raises(ValueError, match="ann_id 5 not in"):
        refcoco.load_refer(tmp_path)
    # a pickle that would need a global (code execution) is refused
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs + [range(3)], f, protocol=2)
    with pytest.raises(ValueError, match="references .*range"):
        refcoco.load_refs_pickle(tmp_path / "refcoco" / "refs(unc).p")
    # missing keys are named
    del refs[0]["sentences"]
    refcoco.save_refs_pickle(refs, tmp_path / "refcoco" / "refs(unc).p")
    with pytest.raises(ValueError, match="missing keys \\['sentences'\\]"):
        refcoco.load_refs_pickle(tmp_path / "refcoco" / "refs(unc).p")


def test_transvg_fixture_formats(tmp_path):
    unc = [
        (
            "COCO_train2014_000000000839.jpg",
            "482127.pth",
            [303.58, 69.03, 293.29, 425.79],
            "guy flopping around on the right",
            [("r1", ["guy"]), ("r8", ["right", "flopping", "around"])],
        ),
    ]
    flickr = [("1000092795.jpg", [10, 20, 110, 220], "two young guys")]
    referit = [("8756_2.jpg", "8756_2_1.mat", [5, 6, 50, 60], "sky", [])]
    for ds, entries in (("unc", unc), ("flickr", flickr), ("referit", referit)):
        (tmp_path / ds).mkdir()
        torch.save(entries, tmp_path / ds / f"{ds}_train.pth")
    u = transvg.load_split(tmp_path, "unc", "train")[0]
    assert u.box == pytest.approx((303.58, 69.03, 596.87, 494.82))
    assert u.box_xywh == pytest.approx((303.58, 69.03, 293.29, 425.79))
    assert u.ann == "482127.pth" and u.attributes[1] == ("r8", ["right", "flopping", "around"])
    # the official loader truncates to int before adding w/h
    assert transvg.load_split(tmp_path, "unc", "train", truncate=True)[0].box == (303, 69, 596, 494)
    f = transvg.load_split(tmp_path, "flickr", "train")[0]
    assert f.box == (10, 20, 110, 220) and f.ann is None and f.phrase == "two young guys"
    assert transvg.load_split(tmp_path, "referit", "train")[0].box == (5, 6, 50, 60)


def test_transvg_roundtrip_and_errors(tmp_path):
    e5 = transvg.make_entry("unc", "a.jpg", [1.0, 2.0, 11.5, 22.0], "the red car")
    e3 = transvg.make_entry("flickr", "b.jpg", [1, 2, 3, 4], "a dog")
    assert e5 == ("a.jpg", transvg.PLACEHOLDER, [1.0, 2.0, 10.5, 20.0], "the red car", transvg.PLACEHOLDER)
    assert e3 == ("b.jpg", [1.0, 2.0, 3.0, 4.0], "a dog")
    p = transvg.save_split([e5], tmp_path, "unc", "val")
    assert p == tmp_path / "unc" / "unc_val.pth"
    # plain lists/tuples/str/float load under weights_only=True
    assert torch.load(p, weights_only=True) == [e5]
    assert transvg.load_split(tmp_path, "unc", "val")[0].box == (1.0, 2.0, 11.5, 22.0)
    with pytest.raises(ValueError, match="expects 3-tuples"):
        transvg.save_split([e5], tmp_path, "flickr", "val")
    with pytest.raises(ValueError, match="unknown TransVG dataset key"):
        transvg.split_path(tmp_path, "refcoco", "val")
    with pytest.raises(ValueError, match="box must be 4"):
        transvg.parse_entries([("a.jpg", [1, 2, 3], "x")], "flickr")
    with pytest.raises(FileNotFoundError):
        transvg.load_split(tmp_path, "unc", "testA")
    # objects other than plain containers are refused by the weights-only loader, with a clear message
    # (old conversion scripts left numpy arrays in the tuples); allow_pickle reads them
    torch.save([("a.jpg", "x", np.array([1.0, 2.0, 3.0, 4.0]), "p", "q")], tmp_path / "unc" / "unc_testB.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        transvg.load_split(tmp_path, "unc", "testB")
    assert transvg.load_split(tmp_path, "unc", "testB", allow_pickle=True)[0].box == (1.0, 2.0, 4.0, 6.0)


def test_refer_to_transvg_fixture_and_cli(tmp_path):
    _write_refer_fixture(tmp_path / "refer")
    counts = refcoco.to_transvg(tmp_path / "refer", tmp_path / "splits")
    assert counts == {"testA": 2, "testB": 1}
    a = transvg.load_split(tmp_path / "splits", "unc", "testA")
    assert [x.phrase for x in a] == ["the lady with the blue shirt", "lady left"]
    assert a[0].img_file == "COCO_train2014_000000581857.jpg" and a[0].ann == "1719310.pth"
    assert a[0].box == pytest.approx((103.93, 299.99, 238.15, 477.41))
    with pytest.raises(ValueError, match="no TransVG key"):
        refcoco.to_transvg(tmp_path / "refer", tmp_path / "s2", split_by="berkeley")
    from groundkit.cli import main

    rc = main(
        ["data", "refer-to-transvg", "--data-root", str(tmp_path / "refer"), "--split-root", str(tmp_path / "s3")]
    )
    assert rc == 0 and (tmp_path / "s3" / "unc" / "unc_testB.pth").is_file()
    assert (
        main(
            ["data", "refer-to-transvg", "--data-root", str(tmp_path / "nowhere"), "--split-root", str(tmp_path / "s4")]
        )
        == 2
    )
