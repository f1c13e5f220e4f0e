//! The `keel.v1.StoreAdmin` service: store-level membership and status.

use tonic::{Request, Response, Status};

use super::status::from_store;
use crate::proto::v1 as pb;
use crate::store::{Member, Store};

pub struct AdminService {
    store: Store,
}

impl AdminService {
    pub fn new(store: Store) -> AdminService {
        AdminService { store }
    }
}

#[tonic::async_trait]
impl pb::store_admin_server::StoreAdmin for AdminService {
    async fn status(&self, _r: Request<pb::StoreStatusRequest>) -> Result<Response<pb::StoreStatusResponse>, Status> {
        Ok(Response::new(self.store.status()))
    }

    async fn add_learner(&self, r: Request<pb::AddLearnerRequest>) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = r.into_inner();
        let node = r.node.ok_or_else(|| Status::invalid_argument("node: Required value"))?;
        if node.addr.is_empty() {
            return Err(Status::invalid_argument("node.addr: Required value"));
        }
        let member = Member { addr: node.addr, name: node.name };
        self.store.add_learner(r.id, member, r.blocking).await.map(Response::new).map_err(from_store)
    }

    async fn change_membership(
        &self,
        r: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = r.into_inner();
        let given = [
            !r.voters.is_empty(),
            !r.add_voters.is_empty(),
            !r.remove_voters.is_empty(),
            !r.set_nodes.is_empty(),
            !r.remove_nodes.is_empty(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(Status::invalid_argument(
                "give exactly one of voters, add_voters, remove_voters, set_nodes, remove_nodes (a cluster needs at least one voter)",
            ));
        }
        self.store.change_members(r).await.map(Response::new).map_err(from_store)
    }

    async fn trigger_snapshot(
        &self,
        _r: Request<pb::TriggerSnapshotRequest>,
    ) -> Result<Response<pb::TriggerSnapshotResponse>, Status> {
        let index = self.store.trigger_snapshot().await.map_err(from_store)?;
        Ok(Response::new(pb::TriggerSnapshotResponse { snapshot_index: index }))
    }
}
