// Generated from pcdeq_kernels/activations.py by scripts/generate_map_ids.py: do not edit.
// tests/test_activations.py fails when this file and the table disagree.
//
// The ids of the maps a solve iterates: an activation's id selects the forward map act(L(x) + u),
// kAdjoint the adjoint map D * (L^T(x) + v). Activation ids are >= 0 and kAdjoint is < 0, so the
// two cannot collide. Switches over ids are generated from PCDEQ_FOR_EACH_ACTIVATION (X(NAME, ID)
// per activation, in id order), so a new table entry reaches every switch; an id without a formula
// in activations.h is a compile-time error there.
#pragma once

namespace pcdeq {

enum Activation : int {
  TANH = 0,
  SOFTSIGN = 1,
  RELU6 = 2,
  SIGMOID = 3,
};

constexpr int kNumActivations = 4;
constexpr int kAdjoint = -1;

}  // namespace pcdeq

#define PCDEQ_FOR_EACH_ACTIVATION(X) X(TANH, 0) X(SOFTSIGN, 1) X(RELU6, 2) X(SIGMOID, 3)
