"""build_text: a text corpus split (King James Bible) as a text artifact."""
