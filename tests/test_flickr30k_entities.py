"""The Flickr30K Entities reader on hand-written files in the release's format."""

from __future__ import annotations

import pytest

from groundkit.formats import flickr30k_entities as F

SENTENCES = """[/EN#10/people Three small children] play near [/EN#12/other a wooden fence] in [/EN#15/scene the garden] .
[/EN#11/people A boy] in [/EN#13/clothing a red jacket] throws [/EN#14/other a ball] .
[/EN#10/people/other Kids] enjoy [/EN#0/notvisual the afternoon] .

"""

ANNOTATION = """<annotation>
\t<filename>42.jpg</filename>
\t<size>
\t\t<width>500</width>
\t\t<height>375</height>
\t\t<depth>3</depth>
\t</size>
\t<object>
\t\t<name>10</name>
\t\t<bndbox>
\t\t\t<xmin>11</xmin>
\t\t\t<ymin>101</ymin>
\t\t\t<xmax>120</xmax>
\t\t\t<ymax>300</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>10</name>
\t\t<name>11</name>
\t\t<bndbox>
\t\t\t<xmin>201</xmin>
\t\t\t<ymin>81</ymin>
\t\t\t<xmax>260</xmax>
\t\t\t<ymax>330</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>12</name>
\t\t<bndbox>
\t\t\t<xmin>1</xmin>
\t\t\t<ymin>200</ymin>
\t\t\t<xmax>500</xmax>
\t\t\t<ymax>375</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>15</name>
\t\t<scene>1</scene>
\t\t<nobndbox>0</nobndbox>
\t</object>
\t<object>
\t\t<name>13</name>
\t\t<scene>0</scene>
\t\t<nobndbox>1</nobndbox>
\t</object>
</annotation>
"""


def test_read_sentences(tmp_path):
    p = tmp_path / "42.txt"
    p.write_text(SENTENCES)
    sents = F.read_sentences(p)
    assert len(sents) == 3
    s0 = sents[0]
    assert s0["sentence"] == "Three small children play near a wooden fence in the garden ."
    assert [ph["phrase"] for ph in s0["phrases"]] == ["Three small children", "a wooden fence", "the garden"]
    assert [ph["first_word_index"] for ph in s0["phrases"]] == [0, 5, 9]
    assert [ph["phrase_id"] for ph in s0["phrases"]] == ["10", "12", "15"]
    assert s0["phrases"][2]["phrase_type"] == ["scene"]
    words = s0["sentence"].split()
    for ph in s0["phrases"]:  # first_word_index points at the phrase inside the plain sentence
        n = len(ph["phrase"].split())
        assert " ".join(words[ph["first_word_index"] : ph["first_word_index"] + n]) == ph["phrase"]
    assert sents[2]["phrases"][0]["phrase_type"] == ["people", "other"]
    assert sents[2]["phrases"][1]["phrase_id"] == "0"


def test_malformed_sentence_names_file_and_line(tmp_path):
    p = tmp_path / "7.txt"
    p.write_text("[/EN#1/people A man walks .\n")
    with pytest.raises(ValueError, match=r"7\.txt:1"):
        F.read_sentences(p)


def test_read_annotations_and_union(tmp_path):
    p = tmp_path / "42.xml"
    p.write_text(ANNOTATION)
    a = F.read_annotations(p)
    assert (a["width"], a["height"], a["depth"]) == (500, 375, 3)
    assert a["boxes"]["10"] == [[10, 100, 119, 299], [200, 80, 259, 329]]  # 0-based
    assert a["boxes"]["11"] == [[200, 80, 259, 329]]  # one box shared by two entities
    assert a["scene"] == ["15"] and a["nobox"] == ["13"]
    assert F.union_box(a["boxes"]["10"]) == [10.0, 80.0, 259.0, 329.0]
    sp = tmp_path / "42.txt"
    sp.write_text(SENTENCES)
    boxes = F.phrase_boxes(F.read_sentences(sp), a)
    assert boxes[0] == [[10.0, 80.0, 259.0, 329.0], [0.0, 199.0, 499.0, 374.0], None]


def test_bad_annotation_is_reported(tmp_path):
    p = tmp_path / "9.xml"
    p.write_text("<annotation><object><name>1</name></object></annotation>")
    with pytest.raises(ValueError, match="size"):
        F.read_annotations(p)
    p.write_text("<annotation><size><width>a</width><height>2</height><depth>3</depth></size></annotation>")
    with pytest.raises(ValueError, match="width"):
        F.read_annotations(p)
    with pytest.raises(ValueError):
        F.union_box([])


def test_read_split(tmp_path):
    p = tmp_path / "val.txt"
    p.write_text("100\n200\n\n")
    assert F.read_split(p) == ["100", "200"]
