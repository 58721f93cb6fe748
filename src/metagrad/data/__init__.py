"""Few-shot image data: readers, downloads, decoded cache and episodic sampling."""
