//! Expert parallelism: the [`Communicator`] trait the layer exchanges rows through, an
//! in-process implementation that runs N ranks as threads (the laptop way to run expert
//! parallelism, and how the tests prove it), and the expert-parallel layer forward.
//!
//! Layout as DeepSpeed: `ep_size` ranks form an expert-parallel group of contiguous ranks;
//! global expert `e` lives on rank `e / (E / ep_size)`.

mod comm;
mod ep;
mod eplb;
mod hierarchical;
mod rendezvous;

pub use comm::{in_process, Communicator, ExpertGroups, InProcessComm};
pub use ep::{EpLayout, Placement, TokenLayout};
pub use eplb::{rebalance_experts, EplbPlan};
pub use hierarchical::Hierarchical;
pub use rendezvous::{share_token, LaunchEnv};
