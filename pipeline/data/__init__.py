"""Raw volumes to prepared slices: dataset discovery and label presets, prepare + manifest, shards, the phantom
generator, BMAD import/export."""
