//! `latchkey.v1.StockService`: validation of stock requests.

use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::{
    deadline::grpc_timeout,
    duration,
    lock::wait_deadline,
    pb,
    status::{FieldExt, InvalidArgument},
};
use crate::{
    config::{LockConfig, StockConfig},
    lock::WaitTimeout,
    stock::{Applied, Order, OrderId, Product, ProductId, StockEngine, Units},
};

/// The StockService implementation; cheap to clone.
#[derive(Clone)]
pub struct StockApi {
    engine: Arc<StockEngine>,
    limits: Arc<(StockConfig, LockConfig)>,
}

impl StockApi {
    pub fn new(engine: Arc<StockEngine>, stock: StockConfig, locks: LockConfig) -> Self {
        Self {
            engine,
            limits: Arc::new((stock, locks)),
        }
    }

    pub fn into_service(self) -> pb::stock_service_server::StockServiceServer<Self> {
        pb::stock_service_server::StockServiceServer::new(self)
    }

    fn product(&self, raw: String, field: &str) -> Result<Product, InvalidArgument> {
        ProductId::parse(raw, &self.limits.0, &self.limits.1).field(field)
    }

    fn order_id(&self, raw: String) -> Result<OrderId, InvalidArgument> {
        OrderId::parse(raw, &self.limits.0).field("order_id")
    }

    /// The request's wait, the configured stock wait when unset.
    fn wait(&self, raw: Option<prost_types::Duration>) -> Result<WaitTimeout, InvalidArgument> {
        let wait = duration(raw, "wait_timeout")?.or(Some(self.limits.0.stock_wait));
        WaitTimeout::parse(wait, &self.limits.1).field("wait_timeout")
    }

    fn order(&self, m: pb::ReduceStockRequest) -> Result<Order, InvalidArgument> {
        let id = self.order_id(m.order_id)?;
        let mut items = Vec::with_capacity(m.items.len());
        for (i, item) in m.items.into_iter().enumerate() {
            let product = self.product(item.product_id, &format!("items[{i}].product_id"))?;
            let quantity = Units::quantity(item.quantity).field(&format!("items[{i}].quantity"))?;
            items.push((product, quantity));
        }
        Order::new(id, items, &self.limits.0).field("items")
    }
}

fn levels(applied: &Applied) -> Vec<pb::StockLevel> {
    applied
        .levels
        .iter()
        .map(|(product, stock)| pb::StockLevel {
            product_id: product.as_str().to_owned(),
            stock: stock.as_u64(),
        })
        .collect()
}

/// Runs `work` in its own task, handing it a future that resolves when the caller went away.
/// A caller that cancels mid-transaction thus never leaves a transaction half-done or product
/// locks held until their leases end: the work finishes (or stops waiting) on its own.
async fn detached<T, F, Fut>(work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(oneshot::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (answer, answered) = oneshot::channel();
    tokio::spawn(work(answer));
    answered
        .await
        .map_err(|_| Status::internal("the stock task ended without an answer"))
}

#[tonic::async_trait]
impl pb::stock_service_server::StockService for StockApi {
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let m = request.into_inner();
        let product = self.product(m.product_id, "product_id")?;
        let stock = Units::stock(m.stock).field("stock")?;
        let deadline = wait_deadline(self.wait(None)?, timeout);
        let engine = self.engine.clone();
        let set = detached(move |mut answer| async move {
            let result = engine.set(&product, stock, deadline, answer.closed()).await;
            let _ = answer.send(result.map(|stock| (product.id, stock)));
        })
        .await??;
        Ok(Response::new(pb::SetStockResponse {
            level: Some(pb::StockLevel {
                product_id: set.0.as_str().to_owned(),
                stock: set.1.as_u64(),
            }),
        }))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let product = self.product(request.into_inner().product_id, "product_id")?;
        let stock = self.engine.get(&product.id).await?;
        Ok(Response::new(pb::GetStockResponse {
            level: Some(pb::StockLevel {
                product_id: product.id.as_str().to_owned(),
                stock: stock.as_u64(),
            }),
        }))
    }

    async fn reduce_stock(
        &self,
        request: Request<pb::ReduceStockRequest>,
    ) -> Result<Response<pb::ReduceStockResponse>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let m = request.into_inner();
        let wait = self.wait(m.wait_timeout)?;
        let order = self.order(m)?;
        let deadline = wait_deadline(wait, timeout);
        let engine = self.engine.clone();
        let order_id = order.id.as_str().to_owned();
        let applied = detached(move |mut answer| async move {
            let result = engine.reduce(&order, deadline, answer.closed()).await;
            let _ = answer.send(result);
        })
        .await??;
        Ok(Response::new(pb::ReduceStockResponse {
            order_id,
            remaining: levels(&applied),
            replayed: applied.replayed,
        }))
    }

    async fn restore_stock(
        &self,
        request: Request<pb::RestoreStockRequest>,
    ) -> Result<Response<pb::RestoreStockResponse>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let m = request.into_inner();
        let order_id = self.order_id(m.order_id)?;
        let deadline = wait_deadline(self.wait(m.wait_timeout)?, timeout);
        let engine = self.engine.clone();
        let applied = detached(move |mut answer| async move {
            let result = engine.restore(&order_id, deadline, answer.closed()).await;
            let _ = answer.send(result);
        })
        .await??;
        Ok(Response::new(pb::RestoreStockResponse {
            remaining: levels(&applied),
            replayed: applied.replayed,
        }))
    }
}
