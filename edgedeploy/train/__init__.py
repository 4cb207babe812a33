"""Training: shared infrastructure (`common`) and one trainer per task (`classify`, `detect`, `segment`)."""
