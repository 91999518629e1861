"""M3I's image branch (issue #16): mixed views, a momentum target encoder, a light decoder
and the intra-/cross-view image-target loss. One idea per module:

- ``views``: two differently augmented views per image, with their crop boxes and flips;
- ``mixing``: block-wise mix of two images' views at the backbone's patch grid;
- ``pos_embed``: target-view patch positions relative to an input view's top-left origin
  (the Siamese Image Modeling scheme) and their 2-D sine-cosine embeddings;
- ``decoder``: mask tokens at those positions read the online feature map of one image;
- ``ema``: the momentum (EMA) target encoder, partitioned like the online model under ZeRO-3;
- ``loss``: normalised-feature regression plus a small decorrelation term.
"""
