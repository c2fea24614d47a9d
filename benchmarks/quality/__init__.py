"""Held-out quality through the real pipeline (retrolm db build, train, eval) on the KJV corpus."""
