"""The portable loader: webdataset reading in torch DataLoader workers, with the DALI loader's options,
augmentations (same probabilities and ranges, Pillow's pixel formulas) and epoch rules.

Used where DALI is not available (macOS, machines without NVIDIA wheels) and as the reference in tests.

Splitting mirrors DALI's reader: each epoch the tar files are put in an order drawn from the seed (the same on
every rank), the concatenated samples are cut into ``world_size`` contiguous parts (rank r takes part r) and each
part into contiguous slices, one per DataLoader worker. A worker seeks straight to its slice's first sample (the
offset comes from the DALI index), reads its samples there a block at a time with every tar header checked,
shuffles them in a buffer, and builds
batches: without pixel augmentations a whole batch at a time (masked and flip choices in one draw, JPEGs decoded
by torchvision's libjpeg-turbo binding, flip and normalisation over the batch, written into a reused
shared-memory buffer), with them one sample at a time in Pillow; both give the same batches for the same seed.
Workers yield full batches and one remainder each; the main process merges the remainders, so a rank yields the
same batches per epoch as the DALI loader (``last_batch`` "partial": ceil(largest part / B), the last holding
what is left, possibly nothing; "drop": floor(smallest part / B) full batches).
"""

from facetool.train.data.fallback.loader import SampleStream, WdsLoader
from facetool.train.data.fallback.reader import epoch_segments, read_samples
from facetool.train.data.fallback.samples import augment, process_sample

__all__ = ["SampleStream", "WdsLoader", "augment", "epoch_segments", "process_sample", "read_samples"]
