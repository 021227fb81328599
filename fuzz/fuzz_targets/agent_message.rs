//! Bytes off the wire: every agent and operator message decodes or is refused, and a decoded report is checked
//! the way the hub checks it (`upkeep_proto::convert::check_report`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use upkeep_proto::v1;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = v1::AgentMessage::decode(data)
        && let Some(v1::agent_message::Body::Register(r) | v1::agent_message::Body::Report(r)) = m.body
    {
        let _ = upkeep_proto::convert::check_report("report", &r);
    }
    if let Ok(r) = v1::NodeReport::decode(data) {
        let _ = upkeep_proto::convert::check_report("report", &r);
    }
    let _ = v1::HubMessage::decode(data);
    let _ = v1::CreateRunRequest::decode(data);
    let _ = v1::PublishImageRequest::decode(data);
});
