"""Quality evaluation over the paged cache (`python -m kvjax.eval ppl ...`)."""
