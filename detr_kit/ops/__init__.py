"""Box operations and the multi-scale deformable attention core."""
