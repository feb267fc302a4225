"""vmcache."""
