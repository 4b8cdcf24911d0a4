"""Generated blocks are found in the README or in the docs/ page that holds their markers."""

from __future__ import annotations

import pytest

from instructrec import blocks


def test_a_block_moved_to_docs_is_still_found_from_the_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("front page\n<!-- a:start -->\nold a\n<!-- a:end -->\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "results.md"
    page.write_text("# results\n<!-- b:start -->\nold b\n<!-- b:end -->\ntail\n")
    assert blocks.replace(readme, "<!-- a:start -->", "<!-- a:end -->", "new a\n") == readme
    assert blocks.replace(readme, "<!-- b:start -->", "<!-- b:end -->", "new b\n") == page
    assert readme.read_text() == "front page\n<!-- a:start -->\nnew a\n<!-- a:end -->\n"
    assert page.read_text() == "# results\n<!-- b:start -->\nnew b\n<!-- b:end -->\ntail\n"
    with pytest.raises(ValueError, match="no markers <!-- c:start -->"):
        blocks.replace(readme, "<!-- c:start -->", "<!-- c:end -->", "x")
