"""Drop-in pieces that join users' own training pipelines to an sfcache store (see docs/)."""
