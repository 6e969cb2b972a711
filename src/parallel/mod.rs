//! Expert parallelism: the [`Communicator`] control plane and the [`Transport`] that
//! moves device tensors between ranks, an in-process implementation that runs N ranks as
//! threads (the laptop way to run expert parallelism, and how the tests prove it), the
//! hierarchical exchange, where the experts live ([`Placement`], EPLB), and the
//! expert-parallel dispatcher a layer is built with.
//!
//! Layout as DeepSpeed: `ep_size` ranks form an expert-parallel group of contiguous ranks;
//! global expert `e` lives on rank `e / (E / ep_size)` unless an EPLB plan places it.

mod comm;
mod ep;
mod eplb;
mod grad_sync;
mod hierarchical;
mod placement;
mod rendezvous;
mod transport;

pub use comm::{in_process, Communicator, ExpertGroups, InProcessComm};
pub use ep::{EpDispatcher, EpState, ExpertParallel, TokenLayout};
pub use eplb::{rebalance_experts, EplbPlan};
pub use grad_sync::GradientSync;
pub use hierarchical::Hierarchical;
pub use placement::Placement;
pub use rendezvous::{share_token, LaunchEnv};
pub use transport::{exchange_via_host, ExchangeOp, RowCounts, Segment, Transport};
