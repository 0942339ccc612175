"""cnnlab's building blocks, channels-last ([N, *spatial, C]; NHWC for images).

  core      option names and checks, `BlockOptions` (what every block shares), BatchNorm
  dropout   Dropout: none / standard / spatial (channels) / dropblock
  conv      ConvBlock (1-3-D, groups, dilation), TableConv (LeNet-5's C3), DenseBlock
  tap_conv  a conv on one channel as a sum of shifted views (fast MNIST first layers on CPU)
  pooling   max / avg / blur (anti-aliased) / adaptive / global pooling, as functions and modules
  blocks    ResidualUnit (He 2016b's five orderings), Inception

One `train` flag drives both BN (batch vs running statistics) and dropout (on vs identity).
RNG streams: `dropout` (element-wise), `channel_dropout` (spatial and DropBlock).
"""

from cnnlab.nets.layers import tap_conv
from cnnlab.nets.layers.blocks import (
                                  RESIDUAL_UNITS,
                                  RESNET_BN_PLACEMENTS,
                                  SHORTCUTS,
                                  Inception,
                                  ResidualUnit,
)
from cnnlab.nets.layers.conv import (
                                  ConvBlock,
                                  DenseBlock,
                                  TableConv,
                                  dropout_layer,
                                  norm_act_dropout,
)
from cnnlab.nets.layers.core import (
                                  ACTIVATIONS,
                                  BN_CONVENTIONS,
                                  BN_PLACEMENTS,
                                  DROPOUT_KINDS,
                                  PADDING_MODES,
                                  BatchNorm,
                                  BlockOptions,
                                  channels_last_dims,
                                  check_choice,
                                  check_rate,
                                  is_int,
                                  normalize_padding,
                                  spatial_dims,
                                  to_tuple,
)
from cnnlab.nets.layers.dropout import Dropout, dropblock_keep_mask, keep_mask
from cnnlab.nets.layers.pooling import (
                                  POOL_KINDS,
                                  AdaptiveAvgPool,
                                  GlobalAvgPool,
                                  Pool,
                                  adaptive_avg_pool,
                                  avg_pool,
                                  binomial_filter,
                                  blur_pool,
                                  global_avg_pool,
                                  max_pool,
)
