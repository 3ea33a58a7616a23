"""build_text: a built-in text corpus split (King James Bible, fortunes) as a text artifact."""
