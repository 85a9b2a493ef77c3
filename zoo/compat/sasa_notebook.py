"""The fastai notebook's ``RelativeSelfAttention`` (asiedubrempong/fastai-experiments,
``attention/stand_alone_SA.ipynb``) on RelZoo's layers, bug for bug.

Code that defines or copies the notebook's class changes one line: drop the class cell and import it::

    from zoo.compat.sasa_notebook import RelativeSelfAttention

    attn = RelativeSelfAttention(64, 128, 7, 8)    # d_in, d_out, ks, groups (stride=1)

Same arguments, same state_dict keys (``qx.0.weight`` ... ``row_embeddings``, ``col_embeddings``) and
initialisation as the notebook. What differs from :class:`zoo.layers.sasa.RelativeSelfAttention`:
``bug_compatible`` defaults to True, so every group adds the *last* group's slice of the relative
embedding table, exactly as the notebook does (spec sasa §3 step 5: with groups > 1 the row offsets
never reach the output and ``row_embeddings`` gets no gradient). Zero padding inside the softmax is
the notebook's in both modes. An even ``ks``, which crashed the notebook, works here.
"""
from __future__ import annotations

from zoo.compat._bug_compatible import bug_compatible_by_default
from zoo.layers import sasa as _sasa

__all__ = ["RelativeSelfAttention"]

RelativeSelfAttention = bug_compatible_by_default(_sasa.RelativeSelfAttention, __name__,
                                                  "stand_alone_SA.ipynb RelativeSelfAttention")
